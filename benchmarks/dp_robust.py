"""Privacy vs utility and poisoning vs robust aggregation, on the demo split into N sites.

Every row is a real `flwr run` (local simulation, the real default models, 2 cores) with the
same short budget, so rows compare with each other, not with the README's 2-site demo:

  python benchmarks/dp_robust.py poisoning [--clients 6] [-c 'num-server-rounds=3 ...']
  python benchmarks/dp_robust.py privacy   [--clients 6] [--noise 0.5,1,2]
  python benchmarks/dp_robust.py client-dp [--clients 10] [--noise 0.5,1]

The demo is split with `fedrag split` (Dirichlet alpha 0.5, seed 0). Hostile sites are the
lowest partition ids, run by benchmarks/attack_app.py in a scratch copy of the app (the real
app never loads it). Each finished row is appended to --out (JSON lines) as it completes, with
the git commit it ran at, so an interrupted table keeps what it measured; rows already
completed in --out AT THIS COMMIT are skipped (a row from other code is measured again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fedrag_app.config import parse_overrides
from fedrag_app.simulation import APP_DIR, run_simulation

BENCH = Path(__file__).resolve().parent
# short runs, the same for every row: 3 rounds x 5 steps, the final model evaluated on 20
# questions per site; the reference rows (REFERENCE) also evaluate the base system (round 0)
BUDGET = {"num-server-rounds": 3, "local-steps": 5, "eval-limit": 20, "fraction-evaluate": 1.0,
          "evaluate-every": 0}  # fmt: skip
REFERENCE = ("fedavg clean", "no DP")


def hostile_app_dir(root: Path) -> Path:
    """A copy of the app whose ClientApp is attack_app:app (the real handlers plus the mod),
    made afresh each time: a reused --work folder must not run an older copy of the code."""
    app = root / "hostile-app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(APP_DIR / "fedrag_app", app / "fedrag_app",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(BENCH / "attack_app.py", app / "attack_app.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace('clientapp = "fedrag_app.client_app:app"', 'clientapp = "attack_app:app"')
    (app / "pyproject.toml").write_text(text)
    return app


def split_demo(root: Path, clients: int) -> Path:
    from fedrag_app.data import resolve_clients
    from fedrag_app.split import split

    out = root / f"demo-{clients}-sites"
    if not out.exists():
        split(resolve_clients(None), out, clients, kind="dirichlet", alpha=0.5, seed=0)
    return out


def commit() -> str:
    """The code a row ran: the checkout's short hash, '+dirty' with uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(BENCH.parent), *args], capture_output=True, text=True,
                              check=False).stdout.strip()  # fmt: skip

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + (
        "+dirty" if git("status", "--porcelain", "--", "fedrag_app", "benchmarks") else ""
    )


def final_metrics(run_dir: Path) -> dict:
    rows = json.loads((run_dir / "history.json").read_text())
    last = max(r["round"] for r in rows)
    agg = next(r for r in rows if r["round"] == last and r["stage"] == "evaluate"
               and r["client"] == "aggregated")  # fmt: skip
    train = [r for r in rows if r["stage"] == "train" and r["client"] != "aggregated"]
    eps = [r["dp-epsilon"] for r in train if r["round"] == last and "dp-epsilon" in r]
    client_eps = [r["dp-client-epsilon"] for r in rows if r["round"] == last
                  and r["client"] == "aggregated" and "dp-client-epsilon" in r]  # fmt: skip
    rejected = sum(1 for r in train if r.get("rejected-non-finite"))
    base = next((r for r in rows if r["round"] == 0 and r["client"] == "aggregated"), None)
    return {
        "EM": round(agg["em"], 1), "F1": round(agg["f1"], 1),
        "base EM": round(base["em"], 1) if base else None,
        "max site epsilon": round(max(eps), 2) if eps else None,
        "client epsilon": round(client_eps[0], 2) if client_eps else None,
        "rejected replies": rejected,
    }  # fmt: skip


def run_row(name: str, config: dict, env: dict, clients: int, app: Path, work: Path) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        start = time.perf_counter()
        result = run_simulation(config, num_supernodes=clients, app_dir=app,
                                log_file=work / f"{name}.log")  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    row = {"row": name, "status": result.status, "seconds": round(time.perf_counter() - start),
           "commit": commit()}  # fmt: skip
    if result.ok and result.run_dir:
        row.update(final_metrics(result.run_dir))
    return row


def rows_for(table: str, args) -> list[tuple[str, dict, dict]]:
    rows: list[tuple[str, dict, dict]] = []
    if table == "poisoning":
        strategies = args.strategies.split(",")
        for strategy in strategies:
            cfg = {"strategy": strategy, "num-malicious": 1, "num-krum-selected": args.clients - 2}
            rows.append((f"{strategy} clean", cfg, {}))
            for attack in ("signflip", "noise", "nan"):
                env = {"FEDRAG_ATTACK": attack, "FEDRAG_ATTACK_SITES": "1"}
                rows.append((f"{strategy} {attack} x1", cfg, env))
            env = {"FEDRAG_ATTACK": "signflip", "FEDRAG_ATTACK_SITES": "2"}
            rows.append((f"{strategy} signflip x2", {**cfg, "num-malicious": 2}, env))
    elif table in ("privacy", "client-dp"):
        dp = "record" if table == "privacy" else "client"
        rows.append(("no DP", {}, {}))
        for z in args.noise.split(","):
            rows.append((f"dp={dp} z={z}", {"dp": dp, "dp-noise-multiplier": float(z)}, {}))
        rows.append((f"dp={dp} epsilon=8", {"dp": dp, "dp-epsilon": 8.0}, {}))
    return rows


def same_run_elsewhere(name: str, args, out: Path) -> dict | None:
    """'no DP' is the poisoning table's 'fedavg clean' (same sites, budget, seed, code): reuse it."""
    other = out.parent / f"poisoning-{args.clients}-sites.jsonl"
    if name != "no DP" or args.config or not other.exists():
        return None
    rows = [json.loads(line) for line in other.read_text().splitlines()]
    return next(
        (
            r
            for r in rows
            if r["row"] == "fedavg clean"
            and r["status"] == "finished:completed"
            and r.get("commit") == commit()
        ),
        None,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("table", choices=["poisoning", "privacy", "client-dp"])
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--strategies", default="fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan")
    p.add_argument("--noise", default="0.5,1.0,2.0")
    p.add_argument("--only", default="", help="comma-separated row names to run")
    p.add_argument("-c", "--config", action="append", default=[])
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fedrag-dp-robust-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or BENCH / "results" / f"{args.table}-{args.clients}-sites.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    here = commit()
    done = (  # a failed row, or one measured on other code, is run again
        {
            row["row"]
            for row in map(json.loads, out.read_text().splitlines())
            if row.get("status") == "finished:completed" and row.get("commit") == here
        }
        if out.exists()
        else set()
    )
    data = split_demo(work, args.clients)
    app = hostile_app_dir(work)
    base = {**BUDGET, "data-root": str(data), "min-nodes": args.clients,
            "output-dir": str(work / "outputs"), **parse_overrides(args.config)}  # fmt: skip
    only = set(filter(None, args.only.split(",")))
    for name, cfg, env in rows_for(args.table, args):
        if name in done or (only and name not in only):
            continue
        if name in REFERENCE:  # also the base system: round 0 and the last round
            cfg = {**cfg, "evaluate-every": base["num-server-rounds"]}
        reused = same_run_elsewhere(name, args, out)
        if reused:
            row = {**reused, "note": "the same run as the poisoning table's"}
        else:
            row = run_row(name.replace(" ", "_").replace("=", ""), {**base, **cfg}, env,
                          args.clients, app, work)  # fmt: skip
        row["row"] = name
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
