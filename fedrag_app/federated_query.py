"""Federated retrieval: every client returns its top-k chunks, the server fuses the lists with
reciprocal rank fusion and answers with the global generator.

Off by default, and a site's decision (``allow-federated-query`` in its node config): unlike
training, it sends retrieved TEXT from each site to the server.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid


def reciprocal_rank_fusion(ranked_lists: list[list[str]], k: int, c: int = 60) -> list[str]:
    """Rank fusion, not score fusion: each client's similarity scores come from its own store
    and are not comparable across clients, its ranks are."""
    scores: dict[str, float] = {}
    for ranked in ranked_lists:
        for rank, text in enumerate(ranked, start=1):
            scores[text] = scores.get(text, 0.0) + 1.0 / (c + rank)
    return sorted(scores, key=lambda t: -scores[t])[:k]


def federated_retrieve(
    grid: Grid,
    question: str,
    k: int,
    arrays: ArrayRecord,
    base_fingerprint: str,
    timeout: float = 600,
) -> list[str]:
    """Clients retrieve with the global query encoder (``arrays``), not whatever they hold.

    A site answers only if its node config allows federated query, with at most its own
    ``max-query-k`` chunks; the others reply with ``refused: federated-query``.
    """
    config = ConfigRecord({"question": question, "k": k, "base-fingerprint": base_fingerprint})
    content = {"arrays": arrays, "config": config}
    messages = [
        Message(
            content=RecordDict(content),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    lists = [list(r.content["hits"]["texts"]) for r in replies if not r.has_error()]
    return reciprocal_rank_fusion(lists, k)
