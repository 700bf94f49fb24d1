"""EM and token F1 (SQuAD normalization), retrieval recall@k and MRR, per client and overall."""

from __future__ import annotations

import re
import string
from collections import Counter

from tqdm.auto import tqdm

from fedrag_app.data import QAPair
from fedrag_app.rag.system import RAGSystem

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def token_f1(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    pred = normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def contains_answer(text: str, answers: tuple[str, ...] | list[str]) -> bool:
    padded = f" {normalize(text)} "
    return any(f" {normalize(a)} " in padded for a in answers if normalize(a))


def first_hit_rank(texts: list[str], answers: tuple[str, ...] | list[str]) -> int:
    """1-based rank of the first retrieved text that contains a gold answer; 0 if none."""
    for rank, text in enumerate(texts, start=1):
        if contains_answer(text, answers):
            return rank
    return 0


def summarize(records: list[dict], k: int) -> dict:
    n = len(records)
    mean = (lambda key: sum(r[key] for r in records) / n) if n else (lambda key: 0.0)
    return {
        "em": 100 * mean("em"),
        "f1": 100 * mean("f1"),
        "recall_at_k": 100 * mean("hit"),
        "mrr": mean("rr"),
        "k": k,
        "n": n,
    }


def evaluate_system(
    system: RAGSystem,
    qa: list[QAPair],
    max_new_tokens: int = 24,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "eval",
) -> tuple[dict, list[dict]]:
    """Returns (summary, per-question records)."""
    records: list[dict] = []
    bar = tqdm(total=len(qa), desc=desc, unit="q", disable=not progress)
    chunk = batch_size * 8  # the generator groups each chunk's prompts by length
    for start in range(0, len(qa), chunk):
        batch = qa[start : start + chunk]
        answers = system.answer([p.question for p in batch], max_new_tokens, batch_size)
        for pair, ans in zip(batch, answers, strict=True):
            rank = first_hit_rank([h.text for h in ans.sources], pair.answers)
            records.append(
                {
                    "question": pair.question,
                    "answers": list(pair.answers),
                    "prediction": ans.text,
                    "em": exact_match(ans.text, pair.answers),
                    "f1": token_f1(ans.text, pair.answers),
                    "hit": float(rank > 0),
                    "rr": 1.0 / rank if rank else 0.0,
                }
            )
        bar.update(len(batch))
    bar.close()
    return summarize(records, system.top_k), records
