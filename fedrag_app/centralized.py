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
from fedrag_app.finetune.loop import seed_everything
from fedrag_app.task import build_generator, build_retriever, evaluate_local, train_local

MARKER = ".fedrag-centralized"  # marks a folder this command wrote, so a re-run may replace it
OUTPUTS = ("adapter", "retriever", "metrics.json", "predictions.json", MARKER)


class OutputExists(ValueError):
    """The output folder holds something this command did not write."""


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse a non-empty folder that is not a previous result, unless ``overwrite``; checked
    before any model loads, so a mistyped --out costs nothing."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise OutputExists(
            f"--out {out} is not empty and is not a previous `fedrag train --centralized` result: "
            "choose a new folder, or pass --overwrite to replace this command's files in it "
            "(adapter/, retriever/, metrics.json, predictions.json; nothing else is touched)"
        )


def run_centralized(
    clients: list[ClientData],
    s: Settings,
    out: str | Path,
    progress: bool = True,
    eval_clients: list[ClientData] | None = None,
    evaluate_before: bool = True,
    overwrite: bool = False,
) -> dict:
    """Evaluate, train, evaluate again; write OUT/metrics.json, OUT/adapter, OUT/retriever.

    Training uses the pooled train sets of ``clients``; evaluation covers ``eval_clients``
    (default: the same clients), e.g. every client's eval set for a client trained alone.

    Outputs are written to a temporary sibling folder and moved into place at the end, so a
    failed run never leaves a half-written OUT. An existing OUT is refused unless it is a
    previous result of this command (it holds MARKER) or ``overwrite``; then only this
    command's own files in it are replaced.
    """
    out = Path(out)
    check_output(out, overwrite)
    start = time.perf_counter()
    seed_everything(s.seed)  # LoRA's initial weights too: one seed, one result
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
        (tmp / MARKER).write_text("written by fedrag train --centralized\n")
        if not out.exists():
            tmp.rename(out)
        else:  # replace our own files, one by one; anything else in OUT stays
            check_output(out, overwrite)  # still ours? (checked again after the long run)
            for name in OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                (tmp / name).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
