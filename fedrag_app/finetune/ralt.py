"""RALT (retrieval-augmented LM training, RA-DIT) and its RAFT variant, for the generator.

RALT: each (question, answer) and each of its top-k retrieved chunks makes one example
(chunk, question) -> answer. RAFT: with probability p the context is the gold chunk plus d
distractors, otherwise d distractors only. The loss covers answer tokens only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fedrag_app.data import QAPair
from fedrag_app.evaluation import contains_answer
from fedrag_app.rag.generator import IGNORE, ExampleTooLong, Generator
from fedrag_app.rag.store import Hit


@dataclass(frozen=True)
class Example:
    question: str
    contexts: tuple[str, ...]
    answer: str
    has_gold: bool = False


def ralt_examples(
    pairs: list[QAPair], hits: list[list[Hit]], k: int, joint: bool = False
) -> list[Example]:
    """``joint``: ONE example per pair with its top-k chunks in one prompt (as answering sees
    them). DP-SGD needs that: a QA pair is then one row of the per-example gradients, so
    clipping bounds what any one record contributes (k rows would give it k clip norms)."""
    if joint:
        return [
            Example(
                p.question,
                tuple(h.text for h in hs[:k]),
                p.answers[0],
                any(contains_answer(h.text, p.answers) for h in hs[:k]),
            )
            for p, hs in zip(pairs, hits, strict=True)
        ]
    return [
        Example(p.question, (h.text,), p.answers[0], contains_answer(h.text, p.answers))
        for p, hs in zip(pairs, hits, strict=True)
        for h in hs[:k]
    ]


def raft_examples(
    pairs: list[QAPair], hits: list[list[Hit]], p_gold: float, distractors: int, rng: random.Random
) -> list[Example]:
    """``hits`` are candidates from the store; the gold chunk is the first containing an answer."""
    out = []
    for pair, hs in zip(pairs, hits, strict=True):
        gold = next((h for h in hs if contains_answer(h.text, pair.answers)), None)
        others = [h for h in hs if not contains_answer(h.text, pair.answers)][:distractors]
        with_gold = gold is not None and rng.random() < p_gold
        chunks = ([gold] if with_gold else []) + others
        rng.shuffle(chunks)
        out.append(
            Example(pair.question, tuple(h.text for h in chunks), pair.answers[0], with_gold)
        )
    return out


class RaltLoss:
    """Causal-LM loss on answer tokens; the prompt and context are labelled IGNORE."""

    def __init__(self, generator: Generator, max_len: int, per_example: bool = False) -> None:
        self.generator = generator
        self.max_len = max_len
        # DP-SGD needs the mean of per-example losses: with one token mean over the batch,
        # an example's gradient would scale with the OTHER examples' answer lengths
        self.per_example = per_example
        self._cache: dict[Example, tuple[list[int], list[int]]] = {}
        self.tokens_not_computed = 0  # shared-prefix tokens run once for a whole batch

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        if ex not in self._cache:
            self._cache[ex] = self.generator.encode_example(
                ex.question, list(ex.contexts), ex.answer, self.max_len
            )
        return self._cache[ex]

    def fits(self, ex: Example) -> bool:
        try:
            self.encode(ex)
        except ExampleTooLong:
            return False
        return True

    def length(self, ex: Example) -> int:
        return len(self.encode(ex)[0])

    def shared(self, batch: list[Example]) -> int:
        """Leading tokens the generator runs once for the whole batch (none under DP-SGD)."""
        if self.per_example:
            return 0
        return self.generator.shared_prefix([self.encode(e) for e in batch])

    def weight(self, batch: list[Example]) -> int:
        """What the batch's mean loss divides by: answer tokens (examples when per-example),
        so that the loop can split a batch into pieces without changing its gradient."""
        if self.per_example:
            return len(batch)
        return sum(sum(y != IGNORE for y in self.encode(e)[1]) for e in batch)

    def __call__(self, batch: list[Example]) -> tuple[torch.Tensor, int]:
        """Mean negative log-likelihood over answer tokens, and the real tokens processed."""
        self.generator.model.train()
        encoded = [self.encode(e) for e in batch]
        token_logp, valid = self.generator.answer_token_logprobs(
            encoded, share_prefix=not self.per_example
        )
        self.tokens_not_computed += (len(batch) - 1) * self.shared(batch)
        if self.per_example:
            loss = -(token_logp.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()
        else:
            loss = -token_logp.sum() / valid.sum()
        return loss, sum(len(ids) for ids, _ in encoded)
