"""Split documents into overlapping token windows of the context encoder's tokenizer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fedrag_app.data import Document


@dataclass(frozen=True)
class Chunk:
    id: str  # a UUID derived from (document id, window): unique however long a document is
    doc_id: str
    title: str
    text: str


def chunk_documents(docs: list[Document], tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Token windows of ``size`` with ``overlap``; the title prefixes every window of its doc."""
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap ({overlap}) must be >= 0 and < chunk size ({size})")
    step = size - overlap
    chunks: list[Chunk] = []
    for doc in docs:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        starts = range(0, max(len(offsets) - overlap, 1), step) if offsets else [0]
        for w, start in enumerate(starts):
            window = offsets[start : start + size]
            text = doc.text[window[0][0] : window[-1][1]] if window else doc.text
            text = f"{doc.title}: {text}" if doc.title else text
            chunks.append(Chunk(chunk_id(doc.id, w), doc.id, doc.title, text))
    return chunks


_NAMESPACE = uuid.UUID("6f1c2a52-4d8e-4f0b-9a57-0c3f7d2e9b11")


def chunk_id(doc_id: str, window: int) -> str:
    """Qdrant point ids are integers or UUIDs: a UUID of the document id and window index
    cannot collide (document ids are unique per corpus, validated in data.py)."""
    return str(uuid.uuid5(_NAMESPACE, f"{doc_id}\x00{window}"))
