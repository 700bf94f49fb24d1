"""Centralized vs federated on the same data and training budget.

Rows: the base system; centralized training on the pooled data of all clients; federated
training (`flwr run`, the configured strategy); each client trained alone on its own data.
Every row is evaluated on every client's eval set, once, after training (federated:
`evaluate-every=0` unless -c sets it), so the pooled and federated wall times hold the same
evaluation. Budget: R rounds x S local steps per client federated, so pooled centralized gets
R x S x C steps and each lone client R x S steps (what it spends federated).

Seeds: the whole table runs once per seed (``--seeds 0,1,2`` by default, overriding a ``seed``
in -c) and ends with the mean over seeds, because one seed's EM on 100 questions moves by
several points.

Run: `make compare ARGS="--strategies fedavg,fedavgm -c 'server-learning-rate=2'"` or
python benchmarks/compare.py [-c 'key=value ...'] [--strategies S1,S2] [--seeds 0,1,2]
[--skip-alone] [--out benchmarks/results/compare.json]. Each federated run's
history.{json,csv,png} is copied beside the JSON output as <out-stem>-<strategy>[-seedN]-history.*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from fedrag_app.centralized import run_centralized
from fedrag_app.config import parse_overrides, settings_from
from fedrag_app.data import resolve_clients
from fedrag_app.simulation import run_simulation
from fedrag_app.task import build_generator, build_retriever, evaluate_local


def _row(name: str, summary: dict, seconds: float) -> dict:
    row = {"system": name, "seconds": round(seconds)}
    for client, m in summary["clients"].items():
        row[f"{client} EM"] = round(m["em"], 1)
    o = summary["overall"]
    row.update(
        {
            "EM": round(o["em"], 1),
            "F1": round(o["f1"], 1),
            "recall@k": round(o["recall_at_k"], 1),
            "MRR": round(o["mrr"], 3),
        }
    )
    return row


def _last_round(history: list[dict], clients) -> dict:
    """The federated run's final evaluation, shaped like an eval summary."""
    last = max(r["round"] for r in history)
    rows = {r["client"]: r for r in history if r["round"] == last and r["stage"] == "evaluate"}
    agg = rows.pop("aggregated")
    names = {float(i): c.name for i, c in enumerate(clients)}
    per_client = {names[r["partition-id"]]: r for r in rows.values()}
    keys = ("em", "f1", "recall_at_k", "mrr")
    return {
        "overall": {k: agg[k] for k in keys},
        "clients": dict(sorted(per_client.items())),
    }


def one_seed(s, overrides: dict, clients, strategies: list[str], skip_alone: bool,
             out: Path, work: Path, tag: str) -> list[dict]:  # fmt: skip
    """Every row of the table at one seed (``s.seed``): same data, same budget."""
    rounds, steps, n = s.num_server_rounds, s.local_steps, len(clients)
    rows = []
    start = time.perf_counter()
    retriever, generator = build_retriever(s), build_generator(s)  # LoRA B = 0: the base
    base, _ = evaluate_local(clients, s, retriever, generator, progress=False)
    rows.append(_row("base system (no fine-tuning)", base, time.perf_counter() - start))
    del retriever, generator
    # the same evaluation on both sides: training, then ONE evaluation of the final system
    start = time.perf_counter()
    pooled = run_centralized(clients, s.replace(local_steps=rounds * steps * n), work / "pooled",
                             evaluate_before=False)  # fmt: skip
    rows.append(
        _row(
            f"centralized, pooled data ({rounds * steps * n} steps)",
            pooled["after"],
            time.perf_counter() - start,
        )
    )

    for strategy in strategies:
        start = time.perf_counter()
        config = {
            **{k: v for k, v in s.to_config().items() if k in overrides},
            "seed": s.seed,
            "strategy": strategy,
            "output-dir": str(work / f"fed-{strategy}"),
        }
        config.setdefault("evaluate-every", 0)  # after the last round only, as pooled is
        log = work / f"fed-{strategy}.log"
        fed = run_simulation(config, num_supernodes=n, log_file=log)
        if not fed.ok:
            raise SystemExit(f"federated run {fed.status}; log: {log}")
        # keep the run's history beside the table: the per-round numbers in the README
        for name in ("history.json", "history.csv", "history.png"):
            shutil.copy(fed.run_dir / name, out.parent / f"{out.stem}-{strategy}{tag}-{name}")
        history = json.loads((fed.run_dir / "history.json").read_text())
        rows.append(
            _row(
                f"federated, {strategy} ({rounds} rounds x {steps} steps x {n} clients)",
                _last_round(history, clients),
                time.perf_counter() - start,
            )
        )

    for client in [] if skip_alone else clients:
        start = time.perf_counter()
        alone = run_centralized([client], s.replace(local_steps=rounds * steps), work / client.name,
                                eval_clients=clients, evaluate_before=False)  # fmt: skip
        rows.append(
            _row(
                f"{client.name} alone ({rounds * steps} steps)",
                alone["after"],
                time.perf_counter() - start,
            )
        )
    return [{"seed": s.seed, **row} for row in rows]


def mean_rows(rows: list[dict], seeds: list[int]) -> list[dict]:
    """One row per system: every numeric column averaged over the seeds."""
    means = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        row: dict = {"seed": "mean " + ",".join(map(str, seeds)), "system": system}
        for key in mine[0]:
            if key not in row:
                value = sum(r[key] for r in mine) / len(mine)
                row[key] = round(value, 3 if key == "MRR" else 1)
        means.append(row)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/compare.json")
    parser.add_argument(
        "--strategies",
        default="",
        help="comma-separated: one federated row per strategy (default: the config's strategy)",
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated; the table adds the mean over seeds"
    )
    parser.add_argument("--skip-alone", action="store_true", help="no client-alone rows")
    args = parser.parse_args()
    overrides = parse_overrides(args.config)
    s = settings_from(overrides)
    seeds = [int(x) for x in args.seeds.split(",")]
    strategies = args.strategies.split(",") if args.strategies else [s.strategy]
    clients = resolve_clients([s.data_root] if s.data_root else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = []
    for seed in seeds:
        work = Path(tempfile.mkdtemp(prefix=f"fedrag-compare-seed{seed}-"))
        tag = f"-seed{seed}" if len(seeds) > 1 else ""
        rows += one_seed(s.replace(seed=seed), overrides, clients, strategies, args.skip_alone,
                         out, work, tag)  # fmt: skip
        print(f"seed {seed} done: {json.dumps(rows[-1])}", flush=True)
    if len(seeds) > 1:
        rows += mean_rows(rows, seeds)

    result = {"config": s.to_config(), "strategies": ",".join(strategies), "seeds": seeds}
    out.write_text(json.dumps({**result, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
