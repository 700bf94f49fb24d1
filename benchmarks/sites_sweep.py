"""Federated against pooled as the number of sites grows ([fed-quality]).

For each data set and each N in --sites, the data set's sites are pooled and dealt to N
non-IID sites with `fedrag split` (flwr-datasets' Dirichlet partitioner over the input site a
document came from, alpha 0.5, split seed 0). Per seed, on that split:

- pooled: centralized training on all N sites' train sets, R x S x N steps (what the
  federation spends), evaluated once;
- one federated row per --variant (`flwr run`, N SuperNodes, R rounds x S steps per site),
  evaluated once after the last round.

Every row evaluates the same questions: every eval question of every site (eval-limit=0 unless
-c sets it), so rows of one data set compare across N. One JSON line per (data, N, seed, row) is appended to
--out as it is measured; rows already there are skipped, so an interrupted sweep resumes.

Run: python benchmarks/sites_sweep.py --data "" --data data/wordnet --sites 2,4,8 --seeds 0,1,2 \\
         --variant today= --variant "new=lora-aggregation=ffa gen-lr=6e-3" [--out FILE.jsonl]
     python benchmarks/sites_sweep.py --summary FILE.jsonl
     python benchmarks/sites_sweep.py --pooled-only -c num-server-rounds=3 ...  # pooled at half
         the budget: how many pooled steps a federated row is worth
     python benchmarks/sites_sweep.py --one-batch -c gen-lr=1.2e-2 ...  # R x S steps of N x the
         batch: federated with neither drift nor averaging error, the sequential steps' cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import _last_round, _row  # noqa: E402

from fedrag_app.centralized import run_centralized  # noqa: E402
from fedrag_app.config import parse_overrides, settings_from  # noqa: E402
from fedrag_app.data import resolve_clients  # noqa: E402
from fedrag_app.simulation import run_simulation  # noqa: E402
from fedrag_app.split import split  # noqa: E402

SAME_EVAL = {"eval-limit": 0, "evaluate-every": 0}


def split_root(data: str, n: int, work: Path) -> Path:
    out = work / f"{Path(data).name or 'demo'}-{n}-sites"
    if not (out / "split.json").exists():
        inputs = resolve_clients([data]) if data else resolve_clients()
        split(inputs, out, n, kind="dirichlet", alpha=0.5, seed=0, overwrite=True)
    return out


def pooled_row(root: Path, config: dict, work: Path, one_batch: bool = False) -> dict:
    """``one_batch``: R x S steps of N x the batch instead of R x S x N steps of one batch:
    the sites' examples of a step averaged as one gradient, what FedAvg would be with no local
    drift and no LoRA averaging error, at the federation's number of sequential steps."""
    s = settings_from({**SAME_EVAL, **config})
    clients = resolve_clients([root])
    steps = s.num_server_rounds * s.local_steps * (1 if one_batch else len(clients))
    batch = s.batch_size * (len(clients) if one_batch else 1)
    start = time.perf_counter()
    s = s.replace(local_steps=steps, batch_size=batch)
    result = run_centralized(clients, s, work / "pooled", evaluate_before=False)
    label = f"pooled ({steps} steps of batch {batch})" if one_batch else f"pooled ({steps} steps)"
    return _row(label, result["after"], time.perf_counter() - start)


def federated_row(root: Path, config: dict, name: str, work: Path) -> dict:
    clients = resolve_clients([root])
    run_config = {**SAME_EVAL, **config, "data-root": str(root),
                  "min-nodes": len(clients), "output-dir": str(work / f"fed-{name}")}  # fmt: skip
    start = time.perf_counter()
    log = work / f"fed-{name}.log"
    fed = run_simulation(run_config, num_supernodes=len(clients), log_file=log)
    if not fed.ok:
        raise SystemExit(f"federated run {fed.status}; log: {log}")
    history = json.loads((fed.run_dir / "history.json").read_text())
    row = _row(f"federated {name}", _last_round(history, clients), time.perf_counter() - start)
    train = [r for r in history if r["stage"] == "train" and r["client"] != "aggregated"]
    rounds = max(r["round"] for r in history)
    row["bytes up per site and round"] = round(
        statistics.mean(r.get("bytes-up", 0.0) for r in train)
    )
    row["seconds per round"] = round((time.perf_counter() - start) / max(rounds, 1), 1)
    errors = [r["lora-averaging-error-gen"] for r in history if "lora-averaging-error-gen" in r]
    if errors:  # LoraAveragingError: what averaging A and B apart cost, per round
        row["lora averaging error per round"] = [round(e, 4) for e in errors]
    return row


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["sites"], r["row"]), []).append(r)
    print("| data | N | row | EM (mean) | per seed | gap to pooled |")
    print("|---|---|---|---|---|---|")
    for (data, n, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        em = statistics.mean(r["EM"] for r in rs)
        pooled = [r["EM"] for r in groups.get((data, n, "pooled"), [])]
        gap = f"{statistics.mean(pooled) - em:+.1f}" if pooled and name != "pooled" else ""
        seeds = " / ".join(f"{r['EM']:.1f}" for r in sorted(rs, key=lambda r: r["seed"]))
        print(f"| {Path(data).name} | {n} | {name} | {em:.1f} | {seeds} | {gap} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", default=[], help='a data root; "" = the demo')
    ap.add_argument("--sites", default="2,4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variant", action="append", default=[], help="NAME=overrides")
    ap.add_argument("-c", "--config", action="append", default=[], help="for every row")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sites_sweep.jsonl"))
    ap.add_argument("--summary", type=Path, help="print the table of a results file and stop")
    ap.add_argument("--pooled-only", action="store_true", help="no federated rows")
    ap.add_argument("--one-batch", action="store_true",
                    help="only a pooled row of R x S steps of N x the batch (row 'pooled-one-batch')")  # fmt: skip
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="fedrag-sites-"))
    common = parse_overrides(args.config)
    variants = [v.partition("=")[::2] for v in args.variant or ["today="]]
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["data"], r["sites"], r["seed"], r["row"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data or [""]:
        for n in (int(x) for x in args.sites.split(",")):
            root = split_root(data, n, work)
            for seed in (int(x) for x in args.seeds.split(",")):
                pooled = "pooled-one-batch" if args.one_batch else "pooled"
                jobs = [(pooled, {})] + [(k, parse_overrides([v])) for k, v in variants]
                jobs = jobs[:1] if args.pooled_only or args.one_batch else jobs
                for name, extra in jobs:
                    key = (data or "demo", n, seed, name)
                    if key in done:
                        continue
                    config = {**common, **extra, "seed": seed}
                    scratch = work / f"{key[0].replace('/', '_')}-{n}-{seed}"
                    # a resumed sweep may skip the row that used to make it
                    scratch.mkdir(parents=True, exist_ok=True)
                    if name.startswith("pooled"):
                        row = pooled_row(root, config, scratch, args.one_batch)
                    else:
                        row = federated_row(root, config, name, scratch)
                    row.update(data=key[0], sites=n, seed=seed, row=name,
                               overrides=" ".join(f"{k}={v}" for k, v in config.items()))  # fmt: skip
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    summary(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
