"""Use what you trained: LangChain and LlamaIndex over a site's store, the merged export, the
report. Real packages, offline, on a demo site's real Qdrant store and a small trained run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedrag_app.centralized import run_centralized
from fedrag_app.config import Settings
from fedrag_app.data import resolve_clients
from fedrag_app.integrations import open_system
from fedrag_app.rag.generator import first_line
from fedrag_app.rag.system import RAGSystem
from fedrag_app.task import build_generator, build_retriever, open_store
from fedrag_app.trained import open_run

DEMO = Path(__file__).resolve().parents[1] / "fedrag_app" / "demo_data" / "jargon"
QUESTIONS = [json.loads(line)["question"] for line in (DEMO / "eval.jsonl").open()][:3]


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A demo site (its corpus whole, a few QA pairs) and a 2-step mode=both centralized run."""
    root = tmp_path_factory.mktemp("use-it")
    site = root / "data" / "jargon"
    site.mkdir(parents=True)
    shutil.copy(DEMO / "corpus.jsonl", site / "corpus.jsonl")
    for split, n in (("train", 8), ("eval", 3)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        (site / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    s = Settings(
        retriever_model=tiny_models["retriever"], generator_model=tiny_models["generator"],
        store_dir=str(root / "stores"), chunk_tokens=64, chunk_overlap=8, top_k=3,
        lsr_k=3, local_steps=2, batch_size=2, max_new_tokens=6, eval_limit=3, mode="both",
    )  # fmt: skip
    run_centralized(resolve_clients([site]), s, root / "run", progress=False)
    _randomise_lora_b(root / "run" / "adapter")
    return root / "run", site, s


def _randomise_lora_b(adapter: Path) -> None:
    """Two steps leave the random tiny LM printing newlines with or without its adapter; a large
    random B makes the adapter decide every token, so "answers as the run does" can fail."""
    import torch
    from safetensors.torch import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    weights = load_file(file)
    torch.manual_seed(1)
    for name, w in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn_like(w) * 2.0
    save_file(weights, file)


def _reference_ids(run: Path, site: Path) -> list[list[str]]:
    """The chunk ids `fedrag query` retrieves with this run's models (its own code path)."""
    r = open_run(run)
    retriever = build_retriever(r.settings, r.query_encoder)
    with open_store(resolve_clients([site])[0], r.settings, retriever, progress=False) as store:
        system = RAGSystem(retriever, None, store, r.settings.top_k)
        return [[h.id for h in hits] for hits in system.retrieve(QUESTIONS)]


def _cli_sources(run: Path, site: Path, capsys) -> list[list[tuple[str, str]]]:
    """(doc id, first line of the text) of each source `fedrag query --run` prints."""
    from fedrag_app.cli import main

    found = []
    for q in QUESTIONS:
        capsys.readouterr()
        assert main(["query", "--run", str(run), "--data", str(site), "--quiet", q]) == 0
        lines = capsys.readouterr().out.splitlines()
        hits = [re.match(r"^  \d+\. \(-?[\d.]+\) (\S+): (.*)$", line) for line in lines]
        found.append([(m[1], m[2]) for m in hits if m])
    return found


def _first_line(doc_id: str, text: str) -> tuple[str, str]:
    return doc_id, text[:160].split("\n")[0]


def test_open_run_reads_the_settings_it_trained_with(trained):
    run, _, s = trained
    r = open_run(run)
    assert r.kind == "centralized" and r.settings.top_k == 3 and r.settings.mode == "both"
    assert r.adapter is not None and r.query_encoder is not None
    with pytest.raises(FileNotFoundError, match="neither a federated run"):
        open_run(run / "adapter")


def test_langchain_retriever_returns_the_chunks_fedrag_query_does(trained, capsys):
    from fedrag_app.integrations import langchain as lc

    run, site, _ = trained
    expected, printed = _reference_ids(run, site), _cli_sources(run, site, capsys)
    docs_retriever = lc.retriever(run, site)
    docs = [docs_retriever.invoke(q) for q in QUESTIONS]
    docs_retriever.vectorstore.fedrag.close()
    assert [[str(d.metadata["_id"]) for d in ds] for ds in docs] == expected
    assert all(len(ids) == 3 for ids in expected)
    assert [[_first_line(d.metadata["doc_id"], d.page_content) for d in ds] for ds in docs] == (
        printed
    )


def test_llamaindex_retriever_returns_the_chunks_fedrag_query_does(trained, capsys):
    from fedrag_app.integrations import llamaindex as li

    run, site, _ = trained
    expected, printed = _reference_ids(run, site), _cli_sources(run, site, capsys)
    nodes_retriever = li.retriever(run, site)
    got = [nodes_retriever.retrieve(q) for q in QUESTIONS]
    assert [[n.node.node_id for n in ns] for ns in got] == expected
    assert [
        [_first_line(n.node.metadata["doc_id"], n.node.get_content()) for n in ns] for ns in got
    ] == printed
    nodes = nodes_retriever.retrieve(QUESTIONS[0])
    assert nodes[0].node.get_content() and "doc_id" in nodes[0].node.metadata
    nodes_retriever.fedrag.close()


def test_the_chains_answer_as_the_run_does(trained):
    """End to end through each stack: same chunks, same prompt, same greedy answer."""
    from fedrag_app.integrations import langchain as lc
    from fedrag_app.integrations import llamaindex as li

    run, site, _ = trained
    r = open_run(run)
    retriever, generator = (
        build_retriever(r.settings, r.query_encoder),
        build_generator(r.settings, r.adapter),
    )
    with open_store(resolve_clients([site])[0], r.settings, retriever, progress=False) as store:
        system = RAGSystem(retriever, generator, store, r.settings.top_k)
        expected = [a.text for a in system.answer(QUESTIONS[:2], r.settings.max_new_tokens)]
    assert all(expected), expected  # an empty answer would prove nothing
    with open_system(run, site) as system:  # one open store, both stacks
        chain = lc.rag_chain(system)
        assert [chain.invoke(q) for q in QUESTIONS[:2]] == expected
        engine = li.query_engine(system)
        responses = [engine.query(q) for q in QUESTIONS[:2]]
        assert [x.response for x in responses] == expected
        assert len(responses[0].source_nodes) == 3
    with pytest.raises(ValueError, match="store-mode=edge"):  # refused before indexing anything
        open_system(run, site, store_mode="edge")


def test_export_is_plain_transformers_and_answers_as_base_plus_adapter(trained, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedrag_app.cli import main

    run, _, s = trained
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert not (out / "generator" / "adapter_config.json").exists()  # no PEFT needed
    merged = AutoModelForCausalLM.from_pretrained(out / "generator")
    tokenizer = AutoTokenizer.from_pretrained(out / "generator")
    peft = build_generator(s, run / "adapter")
    base = build_generator(s)  # a fresh LoRA (B = 0) answers as the base model does
    prompts = [peft.prompt(q, []) for q in QUESTIONS]
    want = peft.generate(prompts, max_new_tokens=8)
    assert want != base.generate(prompts, max_new_tokens=8)  # the adapter matters here
    got = []
    for p in prompts:
        batch = tokenizer([p], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = merged.generate(**batch, max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        got.append(first_line(tokenizer.decode(gen[0, batch["input_ids"].shape[1]:],
                                                skip_special_tokens=True)))  # fmt: skip
    assert got == want
    trained_q = SentenceTransformer(str(run / "retriever"), device="cpu").encode(QUESTIONS)
    exported_q = SentenceTransformer(str(out / "retriever"), device="cpu").encode(QUESTIONS)
    assert (abs(trained_q - exported_q) < 1e-6).all()
    context = json.loads((out / "context-encoder.json").read_text())
    assert context["model"] == s.retriever_model and len(context["weights-fingerprint"]) > 8
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| overall |" in card and "jargon" in card
    assert "no differential privacy" in card
    # never over what it did not write; over its own only when asked
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(run), "--out", str(run)]) == 2  # the run itself: refused
    assert (run / "adapter" / "adapter_config.json").exists()


def test_the_core_path_never_imports_the_bridges():
    """rag/, task.py and the Flower apps work without the extras installed."""
    code = (
        "import sys, fedrag_app.task, fedrag_app.client_app, fedrag_app.server_app, "
        "fedrag_app.cli, fedrag_app.export, fedrag_app.report\n"
        "import fedrag_app.rag.system, fedrag_app.rag.store, fedrag_app.rag.generator\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('langchain', 'langchain_core', 'langchain_qdrant', 'llama_index'))\n"
        "print(bad); assert not bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_report_of_a_run_evaluated_only_at_the_end_says_the_base_is_missing(tmp_path):
    from fedrag_app.report import render
    from fedrag_app.trained import TrainedRun

    rows = [
        {"round": r, "stage": "train", "client": c, "train-loss": 1.0 / r, "bytes-up": 1e6}
        for r in (1, 2) for c in ("aggregated", "partition-0")
    ] + [{"round": 2, "stage": "evaluate", "client": "aggregated", "em": 40.0, "f1": 50.0}]  # fmt: skip
    (tmp_path / "history.json").write_text(json.dumps(rows))
    page = render(TrainedRun(tmp_path, tmp_path, "federated", Settings(evaluate_every=0)))
    assert "first evaluated" not in page and "base system (round 0) was not evaluated" in page
    assert "<tr><td>final</td><td>2</td><td>40.0</td><td>50.0</td>" in page
