"""Integration tests on the real packaged models (MiniLM, SmolLM2-135M) and the demo data."""

import json
import random

import pytest

from fedrag_app.data import Document, QAPair, demo_root
from fedrag_app.evaluation import contains_answer
from fedrag_app.rag.chunking import chunk_documents
from fedrag_app.rag.generator import Generator
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore

pytestmark = pytest.mark.slow


def _rows(client: str, name: str) -> list[dict]:
    lines = (demo_root() / client / f"{name}.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def retriever(real_paths):
    return Retriever(real_paths["retriever"])


@pytest.mark.parametrize("client", ["foldoc", "jargon"])
def test_real_retrieval_finds_the_gold_chunk(retriever, client):
    """Demo eval questions against their gold docs plus 300 distractors, in a real Qdrant store."""
    questions = _rows(client, "eval")[:25]
    docs = {d["id"]: d for d in _rows(client, "corpus")}
    gold = {q["doc_id"] for q in questions}
    others = sorted(set(docs) - gold)
    keep = gold | set(random.Random(0).sample(others, 300))
    corpus = [Document(d["id"], d["text"], d["title"]) for i, d in docs.items() if i in keep]
    with KnowledgeStore.open(client, "memory") as store:
        store.build("fp", lambda: chunk_documents(corpus, retriever.tokenizer, 128, 16),
                    retriever.encode_contexts, retriever.dim, progress=False)  # fmt: skip
        hits = store.search(retriever.encode_queries([q["question"] for q in questions]), 3)
    found = [q["doc_id"] in {h.doc_id for h in hs} for q, hs in zip(questions, hits, strict=True)]
    assert sum(found) / len(found) >= 0.7, found


def test_real_generator_answers_from_the_gold_chunk(real_paths):
    generator = Generator(real_paths["generator"])
    cases = [
        ("What does NFS stand for?", "Network File System"),
        ("What does CPU stand for?", "central processing unit"),
    ]
    docs = {d["title"]: d for d in _rows("foldoc", "corpus")}
    prompts, pairs = [], []
    for question, answer in cases:
        doc = docs[answer]  # the gold doc: its title is the expansion
        prompts.append(generator.prompt(question, [f"{doc['title']}: {doc['text']}"]))
        pairs.append(QAPair(question, (answer,)))
    answers = generator.generate(prompts, max_new_tokens=24)
    assert all(contains_answer(a, p.answers) for a, p in zip(answers, pairs, strict=True)), answers
