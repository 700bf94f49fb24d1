from fedrag_app.evaluation import (
    contains_answer,
    exact_match,
    first_hit_rank,
    normalize,
    summarize,
    token_f1,
)


def test_normalization_drops_case_punctuation_articles():
    assert normalize("The  Transmission-Control, Protocol!") == "transmissioncontrol protocol"


def test_exact_match_and_f1():
    assert exact_match("The ASCII.", ["ascii"]) == 1.0
    assert exact_match("ASCII code", ["ascii"]) == 0.0
    assert token_f1("ASCII code", ["ascii"]) == 2 * (0.5 * 1.0) / 1.5
    assert token_f1("nothing here", ["ascii"]) == 0.0
    assert token_f1("b c", ["x", "y b c"]) == 0.8


def test_recall_and_mrr():
    texts = ["about cats", "TCP stands for Transmission Control Protocol", "more"]
    assert first_hit_rank(texts, ["transmission control protocol"]) == 2
    assert first_hit_rank(texts, ["udp"]) == 0
    assert not contains_answer("category", ["cat"])  # whole words only
    records = [
        {"em": 1.0, "f1": 1.0, "hit": 1.0, "rr": 0.5},
        {"em": 0.0, "f1": 0.5, "hit": 0.0, "rr": 0.0},
    ]
    assert summarize(records, 3) == {
        "em": 50.0,
        "f1": 75.0,
        "recall_at_k": 50.0,
        "mrr": 0.25,
        "k": 3,
        "n": 2,
    }
