"""LlamaIndex over a site's store: ``llama-index-vector-stores-qdrant``'s QdrantVectorStore with
the fine-tuned query encoder, and the merged generator as a ``llama-index-llms-huggingface`` LLM.

    from fedrag_app.integrations.llamaindex import query_engine, retriever
    nodes = retriever("outputs/run-...", "data/site-a").retrieve("What does TCP stand for?")
    print(query_engine("outputs/run-...", "data/site-a").query("What does TCP stand for?"))

Needs ``pip install 'fedrag-app[llamaindex]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.response.schema import Response
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.llms.huggingface import HuggingFaceLLM
from llama_index.vector_stores.qdrant import QdrantVectorStore
from pydantic import PrivateAttr

from fedrag_app.integrations import Opened, as_system, trained_run
from fedrag_app.rag.generator import Generator, first_line
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore
from fedrag_app.trained import merged_generator


class FineTunedEmbedding(BaseEmbedding):
    """Queries through the trained query encoder, texts through the frozen context encoder
    that indexed the store."""

    _retriever: Retriever = PrivateAttr()

    def __init__(self, retriever: Retriever, **kwargs: Any) -> None:
        super().__init__(model_name=retriever.query_ref, **kwargs)
        self._retriever = retriever

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._retriever.encode_queries([query])[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._retriever.encode_contexts([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._retriever.encode_contexts(texts).tolist()


def index(
    system: Opened | str | Path, store: str | Path | KnowledgeStore | None = None, **overrides
) -> VectorStoreIndex:
    """The site's published collection as a LlamaIndex index (nothing is re-embedded); node ids
    are the chunk ids ``fedrag query`` uses, ``text`` the chunk, metadata its doc_id and title.

    ``system``: an ``open_system(...)``, or a run folder with ``store`` (a client folder or a
    KnowledgeStore) and Settings ``overrides``."""
    opened = as_system(system, store, overrides)
    vs = QdrantVectorStore(
        client=opened.store.client, collection_name=opened.collection, text_key="text"
    )
    idx = VectorStoreIndex.from_vector_store(vs, embed_model=FineTunedEmbedding(opened.retriever))
    idx.fedrag = opened  # keeps the store open as long as the index lives
    return idx


def retriever(
    system: Opened | str | Path,
    store: str | Path | KnowledgeStore | None = None,
    k: int | None = None,
    **overrides: Any,
) -> BaseRetriever:
    """Top-``k`` nodes (default: the run's ``top-k``) for a question."""
    idx = index(system, store, **overrides)
    nodes = idx.as_retriever(similarity_top_k=k or idx.fedrag.run.settings.top_k)
    nodes.fedrag = idx.fedrag
    return nodes


def llm(system: Opened | str | Path, **overrides: Any) -> tuple[HuggingFaceLLM, Generator]:
    """The generator with its LoRA merged, greedy; and its Generator (for ``prompt``)."""
    from fedrag_app.task import build_generator

    run = trained_run(system, overrides)
    generator = build_generator(run.settings, run.adapter)
    model = HuggingFaceLLM(
        model=merged_generator(generator),
        tokenizer=generator.tokenizer,
        context_window=run.settings.max_seq_len,
        max_new_tokens=run.settings.max_new_tokens,
        generate_kwargs={"do_sample": False, "pad_token_id": generator.tokenizer.pad_token_id},
        device_map=str(generator.device),
    )
    return model, generator


class FineTunedQueryEngine(CustomQueryEngine):
    """Retrieve, then answer with exactly the prompt the generator was fine-tuned on."""

    retriever: BaseRetriever
    llm: HuggingFaceLLM
    generator: Any

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        prompt = self.generator.prompt(query_str, [n.node.get_content() for n in nodes])
        text = first_line(self.llm.complete(prompt, formatted=True).text)  # one line, as evaluated
        return Response(text, source_nodes=nodes)


def query_engine(
    system: Opened | str | Path, store: str | Path | KnowledgeStore | None = None, **overrides
) -> FineTunedQueryEngine:
    """question -> retrieved nodes -> the fine-tuning prompt -> the merged generator -> Response."""
    opened = as_system(system, store, overrides)
    model, generator = llm(opened)
    return FineTunedQueryEngine(retriever=retriever(opened), llm=model, generator=generator)
