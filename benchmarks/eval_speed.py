"""Evaluation speed: questions per second of `task.evaluate_local` on the demo's eval sets,
with the predictions written out so two code versions can be checked for equal answers.

Run: python benchmarks/eval_speed.py [--limit 50] [-c 'key=value ...'] [--out FILE.json]
     python benchmarks/eval_speed.py --same A.json B.json   # do two runs predict the same?

The base system (default real models, no adapter), every demo client, the store built first
(not timed). Run it on two checkouts to compare (PYTHONPATH=<checkout>).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedrag_app.config import parse_overrides, settings_from
from fedrag_app.data import resolve_clients
from fedrag_app.task import build_generator, build_retriever, evaluate_local, open_stores


def measure(limit: int, overrides: list[str] | None) -> dict:
    s = settings_from(parse_overrides(overrides), eval_limit=limit)
    clients = resolve_clients()
    retriever, generator = build_retriever(s), build_generator(s)
    with open_stores(clients, s, retriever, progress=False):
        pass  # build or reuse the stores before the clock starts
    evaluate_local(clients[:1], s.replace(eval_limit=2), retriever, generator, False)  # warm-up
    start = time.perf_counter()
    summary, records = evaluate_local(clients, s, retriever, generator, progress=False)
    seconds = time.perf_counter() - start
    n = sum(len(r) for r in records.values())
    return {
        "questions": n,
        "seconds": round(seconds, 1),
        "questions-per-second": round(n / seconds, 3),
        "em": round(summary["overall"]["em"], 1),
        "f1": round(summary["overall"]["f1"], 1),
        "config": " ".join(overrides or []),
        "predictions": {c: [r["prediction"] for r in rs] for c, rs in records.items()},
    }


def same(a: Path, b: Path) -> int:
    pa, pb = (json.loads(p.read_text())["predictions"] for p in (a, b))
    diff = [
        (c, i, x, y)
        for c in pa
        for i, (x, y) in enumerate(zip(pa[c], pb[c], strict=True))
        if x != y
    ]
    for c, i, x, y in diff:
        print(f"{c}[{i}]: {x!r} != {y!r}")
    total = sum(len(v) for v in pa.values())
    print(f"{total - len(diff)} of {total} predictions equal")
    return 1 if diff else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="eval questions per client")
    parser.add_argument("-c", "--config", action="append", help="config overrides")
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    parser.add_argument("--same", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args()
    if args.same:
        return same(*args.same)
    result = measure(args.limit, args.config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k != "predictions"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
