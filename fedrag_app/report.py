"""`fedrag report RUN`: one self-contained HTML page of what a consortium asks after a run.

Per round and site: EM, F1, recall@k, MRR, train loss, bytes, wall time per stage; base (round
0) against final; each site's epsilon when DP was on; rejected and failed replies; the config.
Plots are embedded PNGs (matplotlib), so the page can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from fedrag_app.atomic import atomic_text
from fedrag_app.export import privacy_settings
from fedrag_app.history import History
from fedrag_app.trained import TrainedRun, open_run

METRICS = (("em", "EM", 1), ("f1", "F1", 1), ("recall_at_k", "recall@k", 1), ("mrr", "MRR", 3))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return (
        f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def _table(head: list[str], rows: list[list[object]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _fmt(value: object, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _stage_seconds(rows: list[dict]):
    """Wall time per round: the slowest site's train and evaluate (a round waits for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for stage in ("train", "evaluate"):
        per_round: dict[int, float] = {}
        for r in rows:
            if r["stage"] == stage and r["client"] != "aggregated" and "seconds" in r:
                per_round[r["round"]] = max(per_round.get(r["round"], 0.0), float(r["seconds"]))
        if per_round:
            x = sorted(per_round)
            ax.bar([i + (0.2 if stage == "evaluate" else -0.2) for i in x],
                   [per_round[i] for i in x], width=0.4, label=stage)  # fmt: skip
    ax.set_xlabel("round")
    ax.set_ylabel("seconds (slowest site)")
    ax.set_title("wall time per stage")
    if ax.patches:
        ax.legend()
    fig.tight_layout()
    return fig


def render(run: TrainedRun) -> str:
    rows = run.history()
    s = run.settings
    evals = [r for r in rows if r["stage"] == "evaluate" and "em" in r]
    rounds = sorted({r["round"] for r in rows})
    agg = {r["round"]: r for r in evals if r["client"] == "aggregated"}
    parts = [
        f"<h1>fedrag-app run {html.escape(run.run.name)}</h1>",
        f"<p>{html.escape(run.kind)} run; mode {html.escape(s.mode)}; strategy "
        f"{html.escape(s.strategy)}; {len(rounds)} rounds recorded ({', '.join(map(str, rounds))})"
        f"; {html.escape(privacy_settings(s))}.</p>",
    ]
    if agg:
        first, last = agg[min(agg)], agg[max(agg)]
        shown = [("base (round 0)" if first["round"] == 0 else "first evaluated", first)]
        shown = (shown if first is not last else []) + [("final", last)]
        parts += [
            "<h2>Base against final (all sites)</h2>",
            _table(
                ["", "round", *[m[1] for m in METRICS]],
                [
                    [label, r["round"], *[_fmt(r.get(k), d) for k, _, d in METRICS]]
                    for label, r in shown
                ],
            ),
        ]
        if 0 not in agg:
            parts.append(
                "<p>The base system (round 0) was not evaluated in this run (evaluate-every = "
                f"{s.evaluate_every}); `fedrag eval` on the same data gives it.</p>"
            )
    parts += ["<h2>Per round</h2>", _png(History(rows).figure()), _png(_stage_seconds(rows))]
    head = ["round", "stage", "site", *[m[1] for m in METRICS], "train loss", "epsilon",
            "MB up", "MB down", "seconds", "note"]  # fmt: skip
    table = []
    for r in sorted(rows, key=lambda r: (r["round"], r["stage"], str(r["client"]))):
        note = []
        if "error" in r or "error-code" in r:
            note.append(f"failed (code {r.get('error-code', '?')})")
        if r.get("rejected-non-finite"):
            note.append("rejected: non-finite update")
        if r.get("rejected-replies"):
            note.append(f"{int(r['rejected-replies'])} replies rejected")
        epsilon = r.get("dp-epsilon", r.get("dp-client-epsilon"))
        table.append(
            [r["round"], r["stage"], r["client"], *[_fmt(r.get(k), d) for k, _, d in METRICS],
             _fmt(r.get("train-loss"), 4), _fmt(epsilon, 2),
             _fmt(r.get("bytes-up", 0) / 1e6, 2) if "bytes-up" in r else "",
             _fmt(r.get("bytes-down", 0) / 1e6, 2) if "bytes-down" in r else "",
             _fmt(r.get("seconds"), 1), "; ".join(note)]
        )  # fmt: skip
    parts += ["<h2>Every reply</h2>", _table(head, table)]
    config = json.dumps(s.to_config(), indent=2, sort_keys=True)
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(config)}</pre>"]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedrag-app {run.run.name}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(run_folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default RUN/report.html) and return its path."""
    run = open_run(run_folder)
    if not run.history():
        raise FileNotFoundError(f"{run.run}: no history.json (a federated run writes one)")
    path = Path(out) if out else run.run / "report.html"
    atomic_text(path, render(run))
    return path
