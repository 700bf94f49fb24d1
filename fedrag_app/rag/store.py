"""Qdrant knowledge stores: embedded on disk (default), in memory, or a Qdrant server
(``store-mode=edge``, Qdrant's embedded Rust engine, lives in ``edge_store.py``).

A store is built into a collection of its own, ``<name>--<fingerprint>--<build id>`` (the
fingerprint covers corpus digest, chunking and context encoder), and published by pointing the
alias ``<name>`` at it only once every point is in. An interrupted build therefore never looks
complete: the next run sees no alias (or the old one) and rebuilds. Two processes building the
same store on one Qdrant server each write their own collection and never delete the other's;
the second to finish sees the first's build of the same fingerprint published and drops its
own. ``<name>`` is the site's id (its policy's ``site-id``), so sites sharing a server do not
collide. A builder that crashed leaves an unpublished collection behind; it is deleted by the
next build or check of that store: at once in an embedded folder (one process at a time, so no
builder can still be running), on a server only once its build id (which starts with the build's
start time) is older than ``STALE_BUILD_SECONDS``, so a live builder elsewhere is never touched. Stores hold context-encoder embeddings, which never change during
fine-tuning (only the query encoder trains), so they are never re-indexed after training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models
from tqdm.auto import tqdm

from fedrag_app.rag.chunking import Chunk

log = logging.getLogger(__name__)
SCHEMA = 2  # 2: UUID point ids (a store of schema 1 is rebuilt)
STALE_BUILD_SECONDS = 24 * 3600  # on a server, an unpublished build this old is a crashed one


@dataclass
class Hit:
    id: str
    doc_id: str
    title: str
    text: str
    score: float
    vector: np.ndarray | None = None


def fingerprint(corpus_digest: str, encoder_id: str, dim: int, size: int, overlap: int) -> str:
    blob = json.dumps([SCHEMA, corpus_digest, encoder_id, dim, size, overlap])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_store_dir() -> Path:
    """Where embedded stores go when ``store-dir`` is empty: $FEDRAG_STORE_DIR, else the cache."""
    from fedrag_app.rag.models import cache_dir

    return Path(os.environ.get("FEDRAG_STORE_DIR") or cache_dir() / "stores")


class KnowledgeStore:
    """One client's collection; use as a context manager so embedded folders are unlocked."""

    def __init__(self, client: QdrantClient, name: str, exclusive: bool = False) -> None:
        self.client = client
        self.name = name
        # exclusive: no other process can reach this Qdrant (embedded folder, memory)
        self.exclusive = exclusive

    @classmethod
    def open(
        cls,
        name: str,
        mode: str = "embedded",
        store_dir: str | Path = "",
        url: str = "",
        api_key_env: str = "QDRANT_API_KEY",
    ) -> KnowledgeStore:
        if mode == "edge":  # Qdrant's embedded Rust engine: same contract, own module
            from fedrag_app.rag.edge_store import EdgeStore

            return EdgeStore(Path(store_dir or default_store_dir()) / f"{name}.edge", name)  # type: ignore[return-value]
        if mode == "memory":
            client = QdrantClient(location=":memory:")
        elif mode == "embedded":
            folder = Path(store_dir or default_store_dir()) / name
            folder.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(folder))
            except RuntimeError as err:
                if "already accessed" not in str(err):
                    raise
                raise RuntimeError(
                    f"store folder {folder} is open in another process (an embedded Qdrant store "
                    "allows one process at a time): wait for it, set another 'store-dir', or use "
                    "a Qdrant server (store-mode=server)"
                ) from None
        elif mode == "server":
            if not url:
                raise ValueError("store-mode 'server' needs config key 'qdrant-url'")
            # The key is read from the environment only; it is never logged or written out.
            client = QdrantClient(url=url, api_key=os.environ.get(api_key_env) or None)
        else:
            raise ValueError(
                f"unknown store mode {mode!r}: expected embedded, edge, memory or server"
            )
        return cls(client, name, exclusive=mode != "server")

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def published(self) -> str | None:
        """The collection the alias publishes (None before the first complete build)."""
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.name:
                return alias.collection_name
        return None

    def is_current(self, fp: str) -> bool:
        target = self.published()
        return target is not None and target.startswith(f"{self.name}--{fp}")

    def build(
        self,
        fp: str,
        make_chunks: Callable[[], list[Chunk]],
        embed: Callable[[list[str]], np.ndarray],
        dim: int,
        batch_size: int = 128,
        progress: bool = True,
    ) -> bool:
        """Index unless the alias already points at a complete build of ``fp``; True if built."""
        if self.is_current(fp):
            self.prune_crashed_builds()
            return False
        # this build's own collection: no other builder writes or deletes it; the id starts with
        # the start time, so a crashed build can be told from a live one on a shared server
        collection = f"{self.name}--{fp}--{int(time.time()):x}-{uuid.uuid4().hex[:8]}"
        self.client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
        )
        chunks = make_chunks()
        bar = tqdm(
            total=len(chunks), desc=f"indexing {self.name}", unit="chunk", disable=not progress
        )
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            vectors = embed([c.text for c in batch])
            self.client.upsert(
                collection,
                points=[
                    models.PointStruct(
                        id=c.id,
                        vector=v.tolist(),
                        payload={"doc_id": c.doc_id, "title": c.title, "text": c.text},
                    )
                    for c, v in zip(batch, vectors, strict=True)
                ],
                wait=True,
            )
            bar.update(len(batch))
        bar.close()
        if self.is_current(fp):  # another process published the same build meanwhile: use it
            self.client.delete_collection(collection)
            self.prune_crashed_builds()
            return False
        old = self.published()
        # One atomic alias change. Qdrant's CreateAlias replaces an existing alias, so if another
        # builder publishes between these lines the alias ends on this build and the other's
        # collection is left unpublished: still complete, never half-read, and pruned as stale.
        ops: list = (
            []
            if old is None
            else [
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name))
            ]
        )
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=self.name)
            )
        )
        self.client.update_collection_aliases(change_aliases_operations=ops)
        if old and old != collection:
            self.client.delete_collection(old)
        log.info("indexed %d chunks into %s", len(chunks), collection)
        self.prune_crashed_builds()
        return True

    def prune_crashed_builds(self) -> list[str]:
        """Delete this store's unpublished builds that no live builder can own; their names."""
        target, now, pruned = self.published(), time.time(), []
        for c in self.client.get_collections().collections:
            started = _build_start(self.name, c.name)
            if c.name == target or started is None:
                continue  # published, or not a build of this store (another site's, say)
            if self.exclusive or now - started > STALE_BUILD_SECONDS:
                self.client.delete_collection(c.name)
                pruned.append(c.name)
        if pruned:
            log.warning("deleted %d unfinished builds of store %s", len(pruned), self.name)
        return pruned

    def count(self) -> int:
        return self.client.count(self.name).count

    def search(self, vectors: np.ndarray, k: int, with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k chunks for each query vector, with Qdrant's own nearest-neighbour search."""
        if self.published() is None:
            raise RuntimeError(f"store {self.name!r} has not been indexed yet (run `fedrag index`)")
        requests = [
            models.QueryRequest(
                query=v.tolist(), limit=k, with_payload=True, with_vector=with_vectors
            )
            for v in np.asarray(vectors, dtype=np.float32)
        ]
        responses = self.client.query_batch_points(self.name, requests=requests)
        return [
            [
                Hit(
                    id=str(p.id),
                    doc_id=p.payload["doc_id"],
                    title=p.payload.get("title", ""),
                    text=p.payload["text"],
                    score=float(p.score),
                    vector=np.asarray(p.vector, dtype=np.float32) if with_vectors else None,
                )
                for p in r.points
            ]
            for r in responses
        ]


def _build_start(name: str, collection: str) -> float | None:
    """Start time of a build collection of store ``name``; None if it is not one.

    Builds named before start times were recorded (8 hex digits) count as started at 0.
    """
    if not collection.startswith(f"{name}--"):
        return None
    parts = collection[len(name) + 2 :].split("--")
    if len(parts) != 2 or not parts[0]:
        return None  # e.g. store "a" must not prune store "a--b"'s collections
    build = parts[1]
    if re.fullmatch(r"[0-9a-f]{8}", build):
        return 0.0
    m = re.fullmatch(r"([0-9a-f]+)-[0-9a-f]{8}", build)
    return float(int(m.group(1), 16)) if m else None
