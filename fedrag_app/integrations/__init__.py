"""Bridges to LangChain and LlamaIndex (optional extras): the fine-tuned system in their stacks.

Only this package imports them; ``rag/`` and ``task.py`` never do. What both bridges share:
open a run's models and a site's existing store, whose collection the maintained Qdrant
integrations then read directly (no re-indexing: documents keep the frozen context encoder's
embeddings, questions get the fine-tuned query encoder's).

Open a site's store once and hand the system to either stack; it closes with the ``with``:

    with open_system("outputs/run-...", "data/site-a") as system:
        docs = langchain.retriever(system).invoke("What does TCP stand for?")
        print(llamaindex.query_engine(system).query("What does TCP stand for?"))

Every bridge function also takes ``(run_folder, store)`` and keeps that store open for as long
as the object it returns lives (embedded Qdrant folders admit one client at a time).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore
from fedrag_app.trained import TrainedRun, open_run


@dataclass
class Opened:
    """A run's models over one open store; ``close()`` releases the store (embedded folders
    allow one process at a time)."""

    run: TrainedRun
    retriever: Retriever
    store: KnowledgeStore
    collection: str
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_system(
    system: Opened | str | Path, store: str | Path | KnowledgeStore | None, overrides: dict
) -> Opened:
    """An open system as given, or the run folder ``system`` opened over ``store``."""
    if isinstance(system, Opened):
        if store is not None or overrides:
            raise TypeError("pass store and settings to open_system, not with an open system")
        return system
    if store is None:
        raise TypeError(f"{system}: which site's store? pass a client folder or a KnowledgeStore")
    return open_system(system, store, **overrides)


def trained_run(system: Opened | str | Path, overrides: dict) -> TrainedRun:
    return system.run if isinstance(system, Opened) else open_run(system, **overrides)


def open_system(
    run_folder: str | Path, store: str | Path | KnowledgeStore, **overrides: Any
) -> Opened:
    """``store``: a site's client data folder (its store is opened, and built if missing, with
    the run's chunking and the site's ``store-dir`` / ``store-mode`` given in ``overrides``),
    or an open KnowledgeStore."""
    from fedrag_app.data import resolve_clients
    from fedrag_app.task import build_retriever, open_store

    run = open_run(run_folder, **overrides)
    if run.settings.store_mode == "edge" or type(store).__name__ == "EdgeStore":
        raise ValueError(  # refused before anything is indexed: no qdrant-client to hand over
            "the LangChain and LlamaIndex bridges need a qdrant-client store (store-mode "
            "embedded, memory or server); store-mode=edge has none: use fedrag query, or "
            "index the site into an embedded folder too"
        )
    retriever = build_retriever(run.settings, run.query_encoder)
    stack = ExitStack()
    if not isinstance(store, KnowledgeStore):
        client = resolve_clients([store])[0]
        store = stack.enter_context(open_store(client, run.settings, retriever, progress=False))
    collection = store.published()
    if collection is None:
        stack.close()
        raise RuntimeError(f"store {store.name!r} has not been indexed yet (run `fedrag index`)")
    return Opened(run, retriever, store, collection, stack)
