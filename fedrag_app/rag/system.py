"""RAGSystem: question -> top-k chunks from the client's store -> prompt -> answer + sources."""

from __future__ import annotations

from dataclasses import dataclass

from fedrag_app.rag.generator import Generator
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import Hit, KnowledgeStore


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]


class RAGSystem:
    def __init__(
        self, retriever: Retriever, generator: Generator, store: KnowledgeStore, top_k: int = 3
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.store = store
        self.top_k = top_k

    def retrieve(self, questions: list[str], k: int | None = None, with_vectors: bool = False):
        vectors = self.retriever.encode_queries(questions)
        return self.store.search(vectors, k or self.top_k, with_vectors=with_vectors)

    def answer(
        self, questions: list[str], max_new_tokens: int = 24, batch_size: int = 8
    ) -> list[Answer]:
        hits = self.retrieve(questions)
        prompts = [
            self.generator.prompt(q, [h.text for h in hs])
            for q, hs in zip(questions, hits, strict=True)
        ]
        texts = self.generator.generate(
            prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        return [Answer(q, t, hs) for q, t, hs in zip(questions, texts, hits, strict=True)]
