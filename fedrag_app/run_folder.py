"""A federated run's folder: checkpoint after every round, history, final export, resume."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from fedrag_app.history import History


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
            state = path / "checkpoint" / "round.json"
            if not state.exists():
                raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {state}")
            done = int(json.loads(state.read_text())["round"])
            history = History.load(path / "checkpoint" / "history.json")
            history.truncate(done)
            return cls(path, history, done)
        path = root / time.strftime("run-%Y%m%d-%H%M%S")
        while path.exists():
            path = path.with_name(path.name + "x")
        path.mkdir(parents=True)
        return cls(path, History())

    def save_arrays(self, name: str, arrays: ArrayRecord) -> None:
        np.savez(self.path / name, **{k: v.numpy() for k, v in arrays.items()})

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
        tmp = self.path / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **{k: v.numpy() for k, v in arrays.items()})
        export(tmp)
        self.history.save(tmp)
        (tmp / "round.json").write_text(json.dumps({"round": server_round}))
        old = self.path / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if (self.path / "checkpoint").exists():
            (self.path / "checkpoint").rename(old)
        tmp.rename(self.path / "checkpoint")
        shutil.rmtree(old, ignore_errors=True)
        self.history.save(self.path)


def _find_resumable(root: Path) -> Path:
    runs = sorted(p for p in root.glob("run-*") if (p / "checkpoint" / "round.json").exists())
    if not runs:
        raise FileNotFoundError(f"resume='last': no run with a checkpoint under {root}")
    return runs[-1]
