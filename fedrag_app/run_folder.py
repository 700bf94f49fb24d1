"""A federated run's folder: checkpoint after every round, history, final export, resume.

Every write is atomic and durable (``atomic.py``). A checkpoint is written complete into
``checkpoint.tmp`` (``round.json`` last, so its presence means complete), fsynced, then
swapped in: ``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` -> ``checkpoint``. A crash
at any point leaves at least one complete folder among the three, and resume takes the newest.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedrag_app.atomic import atomic_text, atomic_write, fsync_dir, fsync_tree
from fedrag_app.history import History

SLOTS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")


class RunFolder:
    def __init__(self, path: Path, history: History, start_round: int = 0) -> None:
        self.path = path
        self.history = history
        self.start_round = start_round  # rounds already done (resume)

    @classmethod
    def create(cls, output_dir: str, resume: str = "") -> RunFolder:
        root = Path(output_dir).expanduser().resolve()
        if resume:
            path = _find_resumable(root) if resume == "last" else Path(resume).expanduser()
            done = _restore_newest(path)
            if done is None:
                raise FileNotFoundError(
                    f"resume={resume!r}: no complete checkpoint in {path} ({', '.join(SLOTS)})"
                )
            history = History.load(path / "checkpoint" / "history.json")
            history.truncate(done)
            return cls(path, history, done)
        path = root / time.strftime("run-%Y%m%d-%H%M%S")
        while path.exists():
            path = path.with_name(path.name + "x")
        path.mkdir(parents=True)
        return cls(path, History())

    def save_config(self, config: dict) -> None:
        """The run's settings, so export, report and the bridges rebuild what it trained."""
        atomic_text(self.path / "config.json", json.dumps(config, indent=2) + "\n")

    def save_arrays(self, name: str, arrays: ArrayRecord) -> None:
        atomic_write(self.path / name, lambda f: _savez(f, arrays))

    def checkpoint_arrays(self) -> ArrayRecord | None:
        file = self.path / "checkpoint" / "arrays.npz"
        if not self.start_round or not file.exists():
            return None
        with np.load(file) as data:
            return ArrayRecord({k: Array(data[k]) for k in data.files})

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, export) -> None:
        """Write ``checkpoint/`` aside and swap it in: a crash never leaves half a checkpoint.

        ``export(folder)`` writes the adapter and retriever in their standard formats.
        """
        current, tmp, old = (self.path / name for name in SLOTS)
        if (
            _round(current) is None and _round(old) is not None
        ):  # a crash mid-swap: keep the complete one
            old.rename(current)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "arrays.npz", "wb") as f:
            _savez(f, arrays)
        export(tmp)
        self.history.save(tmp)
        fsync_tree(tmp)  # everything durable before the flag that says it is complete
        atomic_text(tmp / "round.json", json.dumps({"round": server_round}))
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        tmp.rename(current)
        fsync_dir(self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.history.save(self.path)

    def save_final(self, arrays: ArrayRecord, export) -> Path:
        """Write ``final/`` aside and rename it in: ``final/`` exists only when complete."""
        final, tmp = self.path / "final", self.path / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        export(tmp, arrays)
        fsync_tree(tmp)
        if final.exists():  # a resumed run that had finished before: replace its own final/
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.path)
        return final


def _savez(f, arrays: ArrayRecord) -> None:
    np.savez(f, **{k: v.numpy() for k, v in arrays.items()})


def _round(folder: Path) -> int | None:
    """The round of a complete checkpoint folder, or None."""
    try:
        return int(json.loads((folder / "round.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return None


def _restore_newest(path: Path) -> int | None:
    """Put the newest complete checkpoint in ``checkpoint/`` (after a crash it may be in
    checkpoint.tmp or checkpoint.old) and drop the others; its round, or None."""
    rounds = {name: _round(path / name) for name in SLOTS}
    complete = {name: r for name, r in rounds.items() if r is not None}
    if not complete:
        return None
    best = max(complete, key=lambda name: (complete[name], name == "checkpoint"))
    if best != "checkpoint":
        shutil.rmtree(path / "checkpoint", ignore_errors=True)
        (path / best).rename(path / "checkpoint")
    for name in SLOTS[1:]:
        shutil.rmtree(path / name, ignore_errors=True)
    fsync_dir(path)
    return complete[best]


def _find_resumable(root: Path) -> Path:
    """The newest run with a complete checkpoint in any slot (a crash mid-swap included)."""
    runs = sorted(
        p for p in root.glob("run-*") if any(_round(p / name) is not None for name in SLOTS)
    )
    if not runs:
        raise FileNotFoundError(f"resume='last': no run with a checkpoint under {root}")
    return runs[-1]
