"""Per-round, per-client metrics of a federated run -> history.json, history.csv, history.png."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fedrag_app.atomic import atomic_text, atomic_write

PLOTTED = ("em", "f1", "recall_at_k", "mrr", "train-loss")
# train-stage metrics: each site's record-level epsilon, the server's client-level one
TRAIN_STAGE = ("train-loss", "dp-epsilon", "dp-client-epsilon")


class History:
    """Rows of {round, stage (train|evaluate), client (node id or 'aggregated'), metrics...}."""

    def __init__(self, rows: list[dict] | None = None) -> None:
        self.rows: list[dict] = list(rows or [])

    def add(self, server_round: int, stage: str, client: str, metrics: dict) -> None:
        self.rows.append({"round": server_round, "stage": stage, "client": client, **metrics})

    def last_round(self) -> int:
        return max((r["round"] for r in self.rows), default=0)

    def truncate(self, server_round: int) -> None:
        self.rows = [r for r in self.rows if r["round"] <= server_round]

    @classmethod
    def load(cls, path: Path) -> History:
        return cls(json.loads(path.read_text())) if path.exists() else cls()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_text(folder / "history.json", json.dumps(self.rows, indent=1))
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_text(folder / "history.csv", out.getvalue())
        self.plot(folder / "history.png")

    def series(self, stage: str, client: str, key: str) -> tuple[list[int], list[float]]:
        points = [
            (r["round"], float(r[key]))
            for r in self.rows
            if r["stage"] == stage and r["client"] == client and key in r
        ]
        return [p[0] for p in points], [p[1] for p in points]

    def plot(self, path: Path) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))
        plt.close(fig)

    def figure(self):
        """Every plotted metric per round: one line per client, the aggregate solid."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        clients = sorted({r["client"] for r in self.rows}, key=lambda c: (c == "aggregated", c))
        fig, axes = plt.subplots(2, 4, figsize=(17, 7))
        for ax, key in zip(axes.flat, (*PLOTTED, "bytes", "epsilon", ""), strict=True):
            if key == "epsilon":
                for client in clients:
                    for tag in ("dp-epsilon", "dp-client-epsilon"):
                        x, y = self.series("train", client, tag)
                        if x:
                            ax.plot(x, y, marker="o", label=f"{client} {tag}")
                ax.set_title("epsilon (delta = dp-delta)" if ax.lines else "epsilon (no DP)")
                ax.set_xlabel("round")
                if ax.lines:
                    ax.legend(fontsize=7)
                continue
            if not key:
                ax.axis("off")
                continue
            for client in clients:
                if key == "bytes":
                    for tag in ("bytes-up", "bytes-down"):
                        x, y = self.series("train", client, tag)
                        if x and client != "aggregated":
                            ax.plot(x, [v / 1e6 for v in y], marker="o", label=f"{client} {tag}")
                    continue
                stage = "train" if key in TRAIN_STAGE else "evaluate"
                x, y = self.series(stage, client, key)
                if x:
                    style = "-" if client == "aggregated" else "--"
                    ax.plot(x, y, style, marker="o", label=str(client))
            ax.set_title("MB per client" if key == "bytes" else key)
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return fig
