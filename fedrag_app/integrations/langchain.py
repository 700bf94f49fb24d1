"""LangChain over a site's store: ``langchain-qdrant``'s QdrantVectorStore with the fine-tuned
query encoder, and the merged generator as a ``langchain-huggingface`` pipeline LLM.

    from fedrag_app.integrations.langchain import retriever, rag_chain
    docs = retriever("outputs/run-...", "data/site-a").invoke("What does TCP stand for?")
    answer = rag_chain("outputs/run-...", "data/site-a").invoke("What does TCP stand for?")

Needs ``pip install 'fedrag-app[langchain]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import VectorStoreRetriever
from langchain_huggingface import HuggingFacePipeline
from langchain_qdrant import QdrantVectorStore

from fedrag_app.integrations import Opened, as_system, trained_run
from fedrag_app.rag.generator import Generator, first_line
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore
from fedrag_app.trained import merged_generator


class FineTunedEmbeddings(Embeddings):
    """Questions through the trained query encoder, documents through the frozen context
    encoder that indexed the store: the two sides of the dual encoder."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    def embed_query(self, text: str) -> list[float]:
        return self.retriever.encode_queries([text])[0].tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.retriever.encode_contexts(texts).tolist()


class SiteVectorStore(QdrantVectorStore):
    """A fedrag store's points carry a flat payload (``text``, ``doc_id``, ``title``), where
    langchain-qdrant expects the metadata nested under one key: every field but the text
    becomes the Document's metadata."""

    @classmethod
    def _document_from_point(
        cls, scored_point: Any, collection_name: str, content_payload_key: str, *_: Any
    ) -> Document:
        payload = dict(scored_point.payload or {})
        text = payload.pop(content_payload_key, "")
        return Document(
            page_content=text,
            metadata={**payload, "_id": scored_point.id, "_collection_name": collection_name},
        )


def vector_store(
    system: Opened | str | Path, store: str | Path | KnowledgeStore | None = None, **overrides
) -> QdrantVectorStore:
    """The site's published collection as a LangChain vector store (payload ``text`` is the
    page content; each Document's metadata holds ``doc_id``, ``title`` and, in ``_id``, the
    chunk id ``fedrag query`` uses).

    ``system``: an ``open_system(...)``, or a run folder with ``store`` (a client folder or a
    KnowledgeStore) and Settings ``overrides``."""
    opened = as_system(system, store, overrides)
    vs = SiteVectorStore(
        client=opened.store.client,
        collection_name=opened.collection,
        embedding=FineTunedEmbeddings(opened.retriever),
        content_payload_key="text",
    )
    vs.fedrag = opened  # keeps the store open as long as the vector store lives
    return vs


def retriever(
    system: Opened | str | Path,
    store: str | Path | KnowledgeStore | None = None,
    k: int | None = None,
    **overrides: Any,
) -> VectorStoreRetriever:
    """Top-``k`` chunks (default: the run's ``top-k``) for a question, as LangChain Documents."""
    vs = vector_store(system, store, **overrides)
    return vs.as_retriever(search_kwargs={"k": k or vs.fedrag.run.settings.top_k})


def llm(system: Opened | str | Path, **overrides: Any) -> tuple[HuggingFacePipeline, Generator]:
    """The generator with its LoRA merged, greedy, as a LangChain LLM; and its Generator, whose
    ``prompt(question, contexts)`` is the format it was fine-tuned on."""
    from transformers import pipeline

    from fedrag_app.task import build_generator

    run = trained_run(system, overrides)
    generator = build_generator(run.settings, run.adapter)
    pipe = pipeline(
        "text-generation",
        model=merged_generator(generator),
        tokenizer=generator.tokenizer,
        max_new_tokens=run.settings.max_new_tokens,
        do_sample=False,
        return_full_text=False,
    )
    return HuggingFacePipeline(pipeline=pipe), generator


def rag_chain(
    system: Opened | str | Path, store: str | Path | KnowledgeStore | None = None, **overrides
) -> Runnable:
    """question -> retrieved chunks -> the fine-tuning prompt -> the merged generator -> text."""
    opened = as_system(system, store, overrides)
    docs = retriever(opened)
    model, generator = llm(opened)

    def prompt(inputs: dict) -> str:
        return generator.prompt(inputs["question"], [d.page_content for d in inputs["docs"]])

    return (
        {"docs": docs, "question": RunnablePassthrough()}
        | RunnableLambda(prompt)
        | model
        | RunnableLambda(first_line)  # an answer is one line, as the run evaluated it
    )
