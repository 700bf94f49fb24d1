"""The `fedrag` command end to end on tiny models: train --centralized, then eval reproduces it."""

import json

import numpy as np
import pytest

from fedrag_app.cli import main


def _model_args(tiny_settings):
    return [
        "--retriever-model", tiny_settings.retriever_model,
        "--generator-model", tiny_settings.generator_model,
        "--store-dir", tiny_settings.store_dir, "--quiet",
        "-c", "chunk-tokens=32 chunk-overlap=4 top-k=2 lsr-k=3 batch-size=2 max-new-tokens=4 eval-limit=4",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "retriever", ["retriever-lora-r=0 ret-lr=1e-3", "retriever-lora-r=8 ret-lr=5e-2"]
)
def test_train_centralized_then_eval_reproduces_after(
    tiny_settings, toy_root, tmp_path, capsys, retriever
):
    """Full and LoRA query encoders alike are saved as plain sentence-transformers folders."""
    out = tmp_path / "out"
    args = _model_args(tiny_settings)
    assert main(["train", "--centralized", "--data", str(toy_root), "--mode", "both", "--out", str(out),
                 "-c", f"local-steps=2 {retriever}", *args]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"before", "after", "seconds", "train"}
    assert metrics["train"]["ret-steps"] == 2 and metrics["train"]["gen-steps"] == 2
    assert (out / "adapter" / "adapter_config.json").exists() and (
        out / "retriever" / "modules.json"
    ).exists()
    assert main(["eval", "--data", str(toy_root), "--adapter", str(out / "adapter"),
                 "--retriever", str(out / "retriever"), "--json", str(tmp_path / "e.json"), *args]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text()) == metrics["after"]
    assert "overall" in capsys.readouterr().out
    # the flags matter: training changed the query encoder (and, fully trained, the numbers),
    # and eval without them gives "before"
    from sentence_transformers import SentenceTransformer

    q = ["What does TCP stand for?"]
    trained = SentenceTransformer(str(out / "retriever"), device="cpu").encode(q)
    base = SentenceTransformer(tiny_settings.retriever_model, device="cpu").encode(q)
    assert not np.allclose(trained, base, atol=1e-6)
    if "lora-r=0" in retriever:
        assert metrics["after"] != metrics["before"]
    assert main(["eval", "--data", str(toy_root), "--json", str(tmp_path / "b.json"), *args]) == 0
    assert json.loads((tmp_path / "b.json").read_text()) == metrics["before"]


def test_query_prints_answer_and_sources(tiny_settings, toy_root, capsys):
    assert (
        main(
            [
                "query",
                "--data",
                str(toy_root / "client-a"),
                "What does TCP stand for?",
                *_model_args(tiny_settings),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[client-a] answer:" in out and "  1. (" in out and "  2. (" in out


def test_query_warns_when_contexts_are_cut(tiny_settings, toy_root, caplog):
    args = ["query", "--data", str(toy_root / "client-a"), "What does TCP stand for?"]
    with caplog.at_level("WARNING", logger="fedrag_app.task"):
        assert main([*args, *_model_args(tiny_settings), "-c", "max-context-chars=10"]) == 0
    assert "query at client-a: 2 retrieved contexts were longer than max-context-chars=10" in (
        caplog.text
    )


def test_bad_data_and_bad_keys_are_reported_not_raised(tiny_settings, tmp_path, capsys):
    (tmp_path / "corpus.jsonl").write_text('{"id": "1", "text": "x"}\n{"id": 2, "text": }\n')
    assert main(["index", "--data", str(tmp_path), *_model_args(tiny_settings)]) == 2
    assert "corpus.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert main(["eval", "-c", "top_k=3"]) == 2
    assert "unknown config key 'top_k'" in capsys.readouterr().err


def test_train_without_centralized_points_to_flower(capsys):
    assert main(["train", "--out", "x"]) == 2
    assert "flwr run" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["index", "query", "eval", "train", "import-hf", "split"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
