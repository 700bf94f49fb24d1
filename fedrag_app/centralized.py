"""Centralized fine-tuning: ``task.train_local`` called in-process on one or pooled clients.

It is the very function the ClientApp's train handler calls, so centralized baselines and
federated runs cannot drift apart.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from fedrag_app.config import Settings
from fedrag_app.data import ClientData
from fedrag_app.task import build_generator, build_retriever, evaluate_local, train_local


def run_centralized(
    clients: list[ClientData],
    s: Settings,
    out: str | Path,
    progress: bool = True,
    eval_clients: list[ClientData] | None = None,
    evaluate_before: bool = True,
) -> dict:
    """Evaluate, train, evaluate again; write OUT/metrics.json, OUT/adapter, OUT/retriever.

    Training uses the pooled train sets of ``clients``; evaluation covers ``eval_clients``
    (default: the same clients), e.g. every client's eval set for a client trained alone.

    Outputs are written to a temporary sibling folder and moved into place at the end, so a
    failed run never leaves a half-written OUT.
    """
    out = Path(out)
    start = time.perf_counter()
    retriever, generator = build_retriever(s), build_generator(s)
    eval_clients = eval_clients or clients
    before = (
        evaluate_local(eval_clients, s, retriever, generator, progress)[0]
        if evaluate_before
        else None
    )
    train = train_local(clients, s, retriever, generator, progress)
    after, records = evaluate_local(eval_clients, s, retriever, generator, progress)
    result = {
        "before": before,
        "after": after,
        "train": train,
        "seconds": time.perf_counter() - start,
        "clients": [c.name for c in clients],
        "config": s.to_config(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        generator.save_adapter(tmp / "adapter")
        retriever.save(tmp / "retriever")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        (tmp / "predictions.json").write_text(json.dumps(records, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
