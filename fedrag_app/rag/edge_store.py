"""A site's knowledge store in Qdrant Edge (``qdrant-edge-py``), Qdrant's embedded Rust engine.

``store-mode=edge``: the same contract as ``store.KnowledgeStore`` (fingerprinted builds,
published only when complete, crashed builds pruned, Qdrant's own search) for a store folder on
the site's disk, without the Python brute force of qdrant-client's local mode: measured on 2
cores, 0.74 ms instead of 10.1 ms per query at 10k chunks, 6.4 instead of 57.6 ms at 50k, and
upserts 40x faster (README "Speed"). Search stays exact: segments are never optimised into an
HNSW graph, whose recall on a store's vectors nobody here has checked.

Layout, one folder per store: ``<store-dir>/<name>.edge/`` holds a ``.lock`` (one process at a
time, as an embedded qdrant-client folder), one shard folder per build,
``<fingerprint>--<start time hex>-<random>``, and ``PUBLISHED``, naming the complete build;
``PUBLISHED`` is written aside and renamed, so a crash leaves the old build or the new one
published, never a half-built one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedrag_app.rag.chunking import Chunk
from fedrag_app.rag.store import Hit

log = logging.getLogger(__name__)
PUBLISHED = "PUBLISHED"


def _edge():
    try:
        import qdrant_edge
    except ImportError:
        raise RuntimeError(
            "store-mode 'edge' needs Qdrant Edge: pip install 'fedrag-app[edge]' "
            "(or qdrant-edge-py)"
        ) from None
    return qdrant_edge


class EdgeStore:
    """One client's store in a Qdrant Edge folder; use as a context manager."""

    exclusive = True  # a folder admits one process at a time (the lock below)

    def __init__(self, folder: Path, name: str) -> None:
        self.qe = _edge()
        self.name, self.folder = name, folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / ".lock", "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(
                f"store folder {folder} is open in another process (an embedded store allows "
                "one process at a time): wait for it, set another 'store-dir', or use a Qdrant "
                "server (store-mode=server)"
            ) from None
        self._shard = None
        self._shard_name: str | None = None

    def __enter__(self) -> EdgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._release_shard()
        finally:
            if not self._lock.closed:
                self._lock.close()  # releases the flock

    def published(self) -> str | None:
        marker = self.folder / PUBLISHED
        if not marker.exists():
            return None
        build = marker.read_text().strip()
        ok = build and "/" not in build and (self.folder / build).is_dir()
        return build if ok else None

    def is_current(self, fp: str) -> bool:
        target = self.published()
        return target is not None and target.startswith(f"{fp}--")

    def build(
        self,
        fp: str,
        make_chunks: Callable[[], list[Chunk]],
        embed: Callable[[list[str]], np.ndarray],
        dim: int,
        batch_size: int = 128,
        progress: bool = True,
    ) -> bool:
        """Index unless a complete build of ``fp`` is published; True if built."""
        if self.is_current(fp):
            self.prune_crashed_builds()
            return False
        qe = self.qe
        build = f"{fp}--{int(time.time()):x}-{uuid.uuid4().hex[:8]}"
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
        shard = qe.EdgeShard.create(str(self.folder / build), config)
        try:
            chunks = make_chunks()
            bar = tqdm(
                total=len(chunks), desc=f"indexing {self.name}", unit="chunk", disable=not progress
            )
            for start in range(0, len(chunks), batch_size):
                batch = chunks[start : start + batch_size]
                vectors = embed([c.text for c in batch])
                points = [
                    qe.Point(
                        c.id,
                        v.astype(np.float32).tolist(),
                        {"doc_id": c.doc_id, "title": c.title, "text": c.text},
                    )
                    for c, v in zip(batch, vectors, strict=True)
                ]
                shard.update(qe.UpdateOperation.upsert_points(points))
                bar.update(len(batch))
            bar.close()
            shard.flush()
        finally:
            shard.close()
        self._release_shard()
        old = self.published()
        aside = self.folder / f".{PUBLISHED}.{build}"
        with open(aside, "w") as f:
            f.write(build)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, self.folder / PUBLISHED)
        if old and old != build:
            shutil.rmtree(self.folder / old, ignore_errors=True)
        log.info("indexed %d chunks into %s/%s", len(chunks), self.folder, build)
        self.prune_crashed_builds()
        return True

    def prune_crashed_builds(self) -> list[str]:
        """Delete build folders that are not published: with the lock held, no builder owns
        them, so they are what a crashed build left."""
        target, pruned = self.published(), []
        for path in self.folder.iterdir():
            if path.is_dir() and "--" in path.name and path.name != target:
                shutil.rmtree(path, ignore_errors=True)
                pruned.append(path.name)
        for path in self.folder.glob(f".{PUBLISHED}.*"):
            path.unlink(missing_ok=True)
        if pruned:
            log.warning("deleted %d unfinished builds of store %s", len(pruned), self.name)
        return pruned

    def _release_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard, self._shard_name = None, None

    def _open_shard(self):
        target = self.published()
        if target is None:
            raise RuntimeError(f"store {self.name!r} has not been indexed yet (run `fedrag index`)")
        if self._shard_name != target:
            self._release_shard()
            self._shard = self.qe.EdgeShard.load(str(self.folder / target))
            self._shard_name = target
        return self._shard

    def count(self) -> int:
        return int(self._open_shard().count(self.qe.CountRequest(exact=True)))

    def search(self, vectors: np.ndarray, k: int, with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k chunks for each query vector: Qdrant Edge's exact search, one batched call."""
        shard, qe = self._open_shard(), self.qe
        requests = [
            qe.QueryRequest(
                limit=k,
                query=qe.Query.Nearest(v.tolist()),
                with_payload=True,
                with_vector=with_vectors,
                params=qe.SearchParams(exact=True),  # never an approximate index
            )
            for v in np.asarray(vectors, dtype=np.float32)
        ]
        results = shard.query_batch(qe.QueryBatchRequest(requests)) if requests else []
        return [
            [
                Hit(
                    id=str(p.id),
                    doc_id=p.payload["doc_id"],
                    title=p.payload.get("title", ""),
                    text=p.payload["text"],
                    score=float(p.score),
                    vector=_vector(p.vector) if with_vectors else None,
                )
                for p in points
            ]
            for points in results
        ]


def _vector(v) -> np.ndarray:
    """The default (unnamed) dense vector of a returned point."""
    if isinstance(v, dict):
        v = v.get("", next(iter(v.values())))
    return np.asarray(v, dtype=np.float32)
