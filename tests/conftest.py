"""Shared fixtures: tiny random models built from configs (fast plumbing tests) and toy data.

Real packaged models (MiniLM, SmolLM2) are used by the tests marked ``slow``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FACTS = [
    ("ASCII", "American Standard Code for Information Interchange", "character encoding"),
    ("TCP", "Transmission Control Protocol", "transport protocol of the Internet"),
    ("RAM", "Random Access Memory", "memory whose access time does not depend on location"),
    ("GNU", "GNU's Not Unix", "free operating system project"),
    ("CPU", "Central Processing Unit", "part of a computer that executes instructions"),
    ("DNS", "Domain Name System", "maps host names to addresses"),
    ("HTML", "HyperText Markup Language", "markup language of web pages"),
    ("SQL", "Structured Query Language", "language for relational databases"),
    ("USB", "Universal Serial Bus", "standard for connecting peripherals"),
    ("LAN", "Local Area Network", "network covering a small area"),
    ("GUI", "Graphical User Interface", "interface with windows and icons"),
    ("API", "Application Programming Interface", "interface between programs"),
]


def inside_a_run() -> None:
    """Flower builds real Messages only in a process that knows its run (a ServerApp sets it at
    start): give this test process one, so strategies run unmodified and return real Messages."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("run_id", 1), ("node_id", SUPERLINK_NODE_ID), ("task_id", 1)):
        try:
            getattr(TaskIdentity, name)  # raises when unset
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_client(folder: Path, facts: list[tuple[str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [
        {"id": f"{folder.name}-{i}", "title": t, "text": f"{t} stands for {e}. It is a {d}."}
        for i, (t, e, d) in enumerate(facts)
    ]
    qa = [{"question": f"What does {t} stand for?", "answers": [e]} for t, e, _ in facts]
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "train.jsonl", qa)
    write_jsonl(folder / "eval.jsonl", qa[: max(2, len(qa) // 2)])
    return folder


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-data")
    make_client(root / "client-a", FACTS[:6])
    make_client(root / "client-b", FACTS[6:])
    return root


@pytest.fixture(scope="session")
def real_paths() -> dict[str, str]:
    from fedrag_app.rag.models import DEFAULT_GENERATOR, DEFAULT_RETRIEVER, resolve_model

    return {
        "retriever": resolve_model(DEFAULT_RETRIEVER),
        "generator": resolve_model(DEFAULT_GENERATOR),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, real_paths) -> dict[str, str]:
    """Randomly initialised BERT and Llama of a few hundred thousand weights, with the real
    tokenizers, saved as ordinary sentence-transformers / transformers folders."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    bert_dir = root / "bert"
    tok = AutoTokenizer.from_pretrained(real_paths["retriever"])
    BertModel(
        BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
        )
    ).save_pretrained(bert_dir)  # fmt: skip
    tok.save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=128)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu"
    )
    st.save(str(root / "st"))

    lm_dir = root / "lm"
    lm_tok = AutoTokenizer.from_pretrained(real_paths["generator"])
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(lm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
            eos_token_id=lm_tok.eos_token_id, pad_token_id=lm_tok.pad_token_id,
            tie_word_embeddings=True,
        )
    ).save_pretrained(lm_dir)  # fmt: skip
    lm_tok.save_pretrained(lm_dir)
    return {"retriever": str(root / "st"), "generator": str(lm_dir)}


@pytest.fixture()
def tiny_settings(tiny_models, tmp_path):
    from fedrag_app.config import Settings

    return Settings(
        retriever_model=tiny_models["retriever"],
        generator_model=tiny_models["generator"],
        store_dir=str(tmp_path / "stores"),
        chunk_tokens=32,
        chunk_overlap=4,
        top_k=2,
        lsr_k=3,
        lsr_batch_size=2,
        local_steps=2,
        batch_size=2,
        max_new_tokens=4,
        eval_limit=4,
    )
