"""Indexing and retrieval at scale with the embedded Qdrant store (qdrant-client local mode).

1. Indexing: chunks per second of ``KnowledgeStore.build`` (token windows, the real MiniLM
   context encoder, upserts) against the encoder alone on the same chunk texts.
2. Query latency, p50 and p99, at 10k, 50k and 200k chunks: one query per call, and batches of
   32 (``query_batch_points``; latency per query). These stores hold random unit vectors:
   encoding 200k chunks with MiniLM takes about 40 minutes on 2 cores, and local mode's search
   is exhaustive, so its cost does not depend on what the vectors mean.
3. The same stores in Qdrant's embedded Rust engine (``qdrant-edge-py``; `pip install
   qdrant-edge-py` first, or the rows are skipped): upsert, HNSW indexing (``optimize``),
   query p50/p99 one at a time and in batches of 32 (``query_batch``), and recall@3 against the
   exact top 3 (its HNSW search is approximate). The exhaustive rows are what
   ``store-mode=edge`` (``fedrag_app/rag/edge_store.py``) does: the same ``query_batch`` call.

Run: python benchmarks/store_scale.py [--sizes 10000,50000,200000] [--index-docs 400]
     [--queries 60] [--out benchmarks/results/store_scale.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from fedrag_app.config import Settings
from fedrag_app.data import demo_root, load_corpus
from fedrag_app.rag.chunking import Chunk, chunk_documents
from fedrag_app.rag.store import KnowledgeStore
from fedrag_app.task import build_retriever


def indexing(docs: int, folder: Path) -> dict:
    s = Settings()
    retriever = build_retriever(s)
    corpus = load_corpus(demo_root() / "foldoc" / "corpus.jsonl")[:docs]
    chunks = chunk_documents(corpus, retriever.tokenizer, s.chunk_tokens, s.chunk_overlap)
    texts = [c.text for c in chunks]
    retriever.encode_contexts(texts[:32])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), 128):  # the batches build() encodes
        retriever.encode_contexts(texts[i : i + 128])
    encoder = time.perf_counter() - start
    with KnowledgeStore.open("indexing", "embedded", folder) as store:
        start = time.perf_counter()
        store.build(
            "fp",
            lambda: chunk_documents(corpus, retriever.tokenizer, s.chunk_tokens, s.chunk_overlap),
            retriever.encode_contexts,
            retriever.dim,
            progress=False,
        )
        built = time.perf_counter() - start
    return {
        "documents": docs,
        "chunks": len(chunks),
        "encoder alone, chunks/s": round(len(chunks) / encoder, 1),
        "build, chunks/s": round(len(chunks) / built, 1),
        "ratio": round(encoder / built, 2),
    }


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def latency(size: int, queries: int, folder: Path, dim: int = 384) -> dict:
    rng = np.random.default_rng(0)
    vectors = _unit(rng, size, dim)
    chunks = [Chunk(str(uuid.UUID(int=i + 1)), f"d{i}", "", f"chunk {i}") for i in range(size)]
    lookup = {c.text: v for c, v in zip(chunks, vectors, strict=True)}
    with KnowledgeStore.open(f"scale-{size}", "embedded", folder) as store:
        start = time.perf_counter()
        store.build("fp", lambda: chunks, lambda t: np.stack([lookup[x] for x in t]), dim,
                    batch_size=1024, progress=False)  # fmt: skip
        upsert = time.perf_counter() - start
        q = _unit(rng, queries, dim)
        store.search(q[:1], 3)  # warm-up
        single = []
        for row in q:
            start = time.perf_counter()
            store.search(row[None], 3)
            single.append(time.perf_counter() - start)
        batched = []
        for i in range(0, queries - 31, 32):
            start = time.perf_counter()
            store.search(q[i : i + 32], 3)
            batched.append((time.perf_counter() - start) / 32)
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 1)  # noqa: E731
    return {
        "chunks": size,
        "upsert seconds": round(upsert, 1),
        "single query p50 ms": ms(single, 50),
        "single query p99 ms": ms(single, 99),
        "batch of 32, per query p50 ms": ms(batched, 50),
        "batch of 32, per query p99 ms": ms(batched, 99),
    }


def edge_latency(size: int, queries: int, folder: Path, dim: int = 384) -> dict | None:
    """Qdrant Edge (embedded Rust engine) on the same random vectors as ``latency``."""
    try:
        import qdrant_edge as qe
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    vectors = _unit(rng, size, dim)
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.create(str(folder / f"edge-{size}"), config)
    try:
        start = time.perf_counter()
        for i in range(0, size, 1024):
            points = [qe.Point(j + 1, vectors[j].tolist(), {"doc": f"d{j}"})
                      for j in range(i, min(i + 1024, size))]  # fmt: skip
            shard.update(qe.UpdateOperation.upsert_points(points))
        upsert = time.perf_counter() - start
        q = _unit(rng, queries, dim)
        exact = np.argsort(-(q @ vectors.T), axis=1)[:, :3] + 1
        plain = _edge_queries(qe, shard, q, exact)  # exhaustive search, as stored
        start = time.perf_counter()
        shard.optimize()  # builds the HNSW index of large segments
        index = time.perf_counter() - start
        hnsw = _edge_queries(qe, shard, q, exact)
        hnsw_256 = _edge_queries(qe, shard, q, exact, ef=256)
    finally:
        shard.close()
    return {
        "chunks": size,
        "engine": "qdrant-edge",
        "upsert seconds": round(upsert, 1),
        "exhaustive": plain,
        "index seconds": round(index, 1),
        "hnsw": hnsw,
        "hnsw, ef=256": hnsw_256,
    }


def _edge_queries(qe, shard, q: np.ndarray, exact: np.ndarray, ef: int | None = None) -> dict:
    params = qe.SearchParams(hnsw_ef=ef) if ef else None

    def request(v: np.ndarray):
        return qe.QueryRequest(
            limit=3, query=qe.Query.Nearest(v.tolist()), with_payload=True, params=params
        )

    shard.query(request(q[0]))  # warm-up
    single, found = [], []
    for row in q:
        start = time.perf_counter()
        found.append(shard.query(request(row)))
        single.append(time.perf_counter() - start)
    batched = []
    for i in range(0, len(q) - 31, 32):
        start = time.perf_counter()
        shard.query_batch(qe.QueryBatchRequest([request(v) for v in q[i : i + 32]]))
        batched.append((time.perf_counter() - start) / 32)
    recall = np.mean(
        [len({p.id for p in f} & set(e.tolist())) / 3 for f, e in zip(found, exact, strict=True)]
    )
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 2)  # noqa: E731
    return {
        "single query p50 ms": ms(single, 50),
        "single query p99 ms": ms(single, 99),
        "batch of 32, per query p50 ms": ms(batched, 50),
        "batch of 32, per query p99 ms": ms(batched, 99),
        "recall@3 vs exact": round(float(recall), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--index-docs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/store_scale.json")
    parser.add_argument("--edge-only", action="store_true", help="skip qdrant-client's rows")
    args = parser.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [int(x) for x in args.sizes.split(",")]
        if not args.edge_only:
            result["indexing"] = indexing(args.index_docs, Path(tmp))
            print(result["indexing"], flush=True)
            result["latency"] = []
            for size in sizes:
                result["latency"].append(latency(size, args.queries, Path(tmp)))
                print(result["latency"][-1], flush=True)
        result["edge"] = []
        for size in sizes:
            row = edge_latency(size, args.queries, Path(tmp))
            if row is None:
                print("qdrant-edge-py is not installed: its rows are skipped", flush=True)
                break
            result["edge"].append(row)
            print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
