import gzip
import json

import pytest

from fedrag_app.data import DataError, demo_root, load_corpus, load_qa, resolve_clients


def write(path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "1", "text": "a"}\n{"id": "2", "text": "b"\n', r"corpus.jsonl:2: invalid JSON"),
        ('{"id": "1", "text": "a"}\n\n{"text": "b"}\n', r"corpus.jsonl:3: field 'id' missing"),
        ('{"id": "1", "text": 5}\n', r"corpus.jsonl:1: field 'text' must be a string, got int"),
        (
            '{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n',
            r":2: duplicate id '1' \(first on line 1\)",
        ),
        ("\n\n", r"corpus.jsonl: empty corpus"),
        ('["not", "an", "object"]\n', r":1: expected a JSON object, got list"),
        (b'{"id": "1", "text": "caf\xe9"}\n', r"corpus.jsonl:1: not valid UTF-8"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "corpus.jsonl"
    write(path, content)
    with pytest.raises(DataError, match=message):
        load_corpus(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"answers": ["x"]}\n', r"train.jsonl:1: field 'question' missing"),
        ('{"question": "q"}\n', r"train.jsonl:1: field 'answers' \(or 'answer'\) missing"),
        (
            '{"question": "q", "answers": []}\n',
            r":1: field 'answers' must be a non-empty string list",
        ),
        (
            '{"question": "q", "answers": [1]}\n',
            r":1: field 'answers' must be a non-empty string list",
        ),
        ('{"question": "", "answer": "x"}\n', r":1: field 'question' is empty"),
        ("", r"train.jsonl: no QA pairs"),
    ],
)
def test_qa_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    write(path, content)
    with pytest.raises(DataError, match=message):
        load_qa(path)


def test_qa_accepts_answer_string_extra_fields_and_gzip(tmp_path):
    rows = [
        {"question": "q1", "answer": "a", "extra": 1},
        {"question": "q2", "answers": ["b", "c"]},
    ]
    path = tmp_path / "eval.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pairs = load_qa(path)
    assert [p.answers for p in pairs] == [("a",), ("b", "c")]


def test_resolve_clients_from_roots_and_folders(toy_root, tmp_path):
    clients = resolve_clients([toy_root])
    assert [c.name for c in clients] == ["client-a", "client-b"]
    assert [c.name for c in resolve_clients([toy_root / "client-b"])] == ["client-b"]
    with pytest.raises(DataError, match="neither a client folder"):
        resolve_clients([tmp_path])
    with pytest.raises(DataError, match="must be unique"):
        resolve_clients([toy_root, toy_root / "client-a"])


def test_demo_data_is_non_iid_and_large_enough():
    clients = resolve_clients([demo_root()])
    assert len(clients) >= 2
    corpora = []
    for client in clients:
        docs = client.corpus()
        train, evaluation = client.qa("train"), client.qa("eval")
        assert len(docs) >= 1000 and len(train) >= 300 and len(evaluation) >= 100, client.name
        assert not {p.question for p in train} & {p.question for p in evaluation}
        corpora.append({d.id for d in docs})
    assert not corpora[0] & corpora[1]


def test_hf_import_through_flwr_datasets(tmp_path):
    from fedrag_app.hf_import import import_hf

    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(20))
    )
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(10)))
    folders = import_hf(
        tmp_path / "root", 2, qa_dataset="json", corpus_dataset="json",
        question_column="q", answer_column="a", text_column="body",
        qa_files=str(qa), corpus_files=str(corpus),
    )  # fmt: skip
    clients = resolve_clients([tmp_path / "root"])
    assert [c.folder for c in clients] == folders
    assert sum(len(c.qa("train")) + len(c.qa("eval")) for c in clients) == 20
    assert sum(len(c.corpus()) for c in clients) == 10
    with pytest.raises(DataError, match="column 'nope' missing"):
        import_hf(tmp_path / "bad", 2, "json", "json", question_column="nope",
                  answer_column="a", text_column="body", qa_files=str(qa), corpus_files=str(corpus))  # fmt: skip


def test_hf_import_of_a_squad_shaped_set_uses_nested_answers_and_its_own_contexts(tmp_path, capsys):
    from fedrag_app.cli import main

    rows = [
        {"title": f"T{i % 5}", "context": f"Passage {i % 5} says fact {i} is value-{i}.",
         "question": f"What is fact {i}?", "answers": {"text": [f"value-{i}"], "answer_start": [3]}}
        for i in range(30)
    ]  # fmt: skip
    squad = tmp_path / "squad.jsonl"
    squad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["import-hf", "--clients", "3", "--qa-dataset", "json", "--qa-files", str(squad)]
    # the dict itself is refused, with the fix named
    assert main([*base, "--out", str(tmp_path / "bad"), "--answer-column", "answers",
                 "--context-column", "context"]) == 2  # fmt: skip
    assert (
        "holds dict, not a string or a list of strings (a nested column" in capsys.readouterr().err
    )
    assert main([*base, "--out", str(tmp_path / "root"), "--answer-column", "answers.text",
                 "--context-column", "context", "--title-column", "title"]) == 0  # fmt: skip
    clients = resolve_clients([tmp_path / "root"])
    assert len(clients) == 3
    for client in clients:
        texts = {d.text for d in client.corpus()}
        pairs = client.qa("train") + client.qa("eval")
        assert all(p.answers[0].startswith("value-") for p in pairs)
        # every question's supporting passage is in its own site's corpus, once
        for p in pairs:
            i = int(p.answers[0].split("-")[1])
            assert f"Passage {i % 5} says fact {i} is value-{i}." in texts
        assert len(texts) == len(client.corpus())
    # a second import never writes over what it did not write, nor over itself unasked
    common = ["--answer-column", "answers.text", "--context-column", "context"]
    assert main([*base, "--out", str(tmp_path / "root"), *common]) == 2
    assert "holds a previous import; pass --overwrite" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*base, "--out", str(mine), *common]) == 2
    assert "not empty and not a previous import" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    base2 = ["import-hf", "--clients", "2", "--qa-dataset", "json", "--qa-files", str(squad)]
    assert main([*base2, "--out", str(tmp_path / "root"), *common, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [
        "client-0", "client-1", "import.json"]  # fmt: skip


def test_qa_files_and_the_corpus_digest_are_read_once_per_file_version(tmp_path, monkeypatch):
    """Every Flower message re-opens a site's files: unchanged files are not parsed again."""
    import os

    import fedrag_app.data as data

    reads = []
    real = data.read_jsonl
    monkeypatch.setattr(data, "read_jsonl", lambda path: reads.append(path) or real(path))
    f = tmp_path / "train.jsonl"

    def write(*answers: str) -> None:
        f.write_text(
            "".join(json.dumps({"question": f"q {a}?", "answer": a}) + "\n" for a in answers)
        )

    write("one", "two")
    first = load_qa(f)
    first.append("not a pair")  # a caller's list is its own
    assert len(load_qa(f)) == 2 and len(reads) == 1
    digest = data.file_digest(f)
    assert data.file_digest(f) == digest
    write("one", "six")  # same size: the modification time tells
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert [p.answers for p in load_qa(f)] == [("one",), ("six",)] and len(reads) == 2
    assert data.file_digest(f) != digest
    write("one", "two", "three")
    assert len(load_qa(f)) == 3 and len(reads) == 3
    f.write_text("{not json\n")
    for _ in range(2):  # a failure is never cached
        with pytest.raises(DataError, match="train.jsonl:1"):
            load_qa(f)
