"""LSR variants on one data root: recall@k and MRR on ALL eval questions before and after
training the query encoder (mode = retriever, pooled train sets of the root's clients).

Run: python benchmarks/lsr_sweep.py [--data ROOT] [--seeds 0 1 2] [--steps 60]
         --variant "before=lsr-batch-size=4" --variant new= [--out FILE.jsonl]
     python benchmarks/lsr_sweep.py [--data ROOT] --signal 4 8 16 [--questions 200]

``--signal`` trains nothing: it asks, on the training questions, whether the LM's preference
over the base retriever's top-k agrees with the gold (answer-containing) chunks better than the
retriever's own ranking does. LSR can only teach what that preference knows, so this predicts in
minutes what a 60-step run would find in half an hour.

One JSON line per (variant, seed) is appended to --out as soon as it is measured, so a long
sweep that stops keeps what it measured; --summary FILE.jsonl prints the mean table. Retrieval
only: no answers are generated (EM needs the generator; `fedrag train --mode both` measures it).
The generator is frozen in retriever mode, so one copy serves every run; the query encoder's
LoRA starts from each seed's own initialisation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedrag_app.config import parse_overrides, settings_from
from fedrag_app.data import resolve_clients
from fedrag_app.evaluation import contains_answer, first_hit_rank
from fedrag_app.finetune.loop import seed_everything
from fedrag_app.task import build_generator, build_retriever, open_stores, train_local

KS = (1, 3, 5, 10)


def retrieval(clients, stores, retriever) -> dict:
    """recall@k (%) for k in KS and MRR@10 over every eval question of every client."""
    ranks = []
    for client, store in zip(clients, stores, strict=True):
        qa = client.qa("eval")
        hits = store.search(retriever.encode_queries([p.question for p in qa]), max(KS))
        ranks += [
            first_hit_rank([h.text for h in hs], p.answers) for p, hs in zip(qa, hits, strict=True)
        ]
    r = np.array(ranks)
    out = {f"recall@{k}": round(100 * float(((r > 0) & (r <= k)).mean()), 2) for k in KS}
    out["mrr"] = round(float(np.where(r > 0, 1.0 / np.maximum(r, 1), 0).mean()), 4)
    out["n"] = len(ranks)
    return out


@torch.no_grad()
def signal(data: str, ks: list[int], questions: int, generator) -> list[dict]:
    """Agreement of the LM's preference (sum and mean targets) with gold, per candidate count k.

    fix: of the questions whose retrieved top-1 lacks the answer but whose top-k holds it, the %
    where the LM's top choice holds it (what LSR can repair); keep: of those whose top-1 holds
    it, the % where the LM's top choice does too (what LSR must not break).
    """
    clients = resolve_clients([data]) if data else resolve_clients()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = settings_from({**({"data-root": data} if data else {}), "store-dir": tmp})
        retriever = build_retriever(s)
        with open_stores(clients, s, retriever, progress=False) as stores:
            for client, store in zip(clients, stores, strict=True):
                qa = client.qa("train")
                pick = rng.permutation(len(qa))[: questions // len(clients)]
                qa = [qa[i] for i in pick]
                hits = store.search(retriever.encode_queries([p.question for p in qa]), max(ks))
                for pair, hs in zip(qa, hits, strict=True):
                    enc = [
                        generator.encode_example(pair.question, [h.text], pair.answers[0], 640)
                        for h in hs
                    ]
                    logp, valid = generator.answer_token_logprobs(enc)
                    total = logp.sum(-1).float().cpu().numpy()
                    rows.append(
                        {
                            "gold": np.array([contains_answer(h.text, pair.answers) for h in hs]),
                            "sum": total,
                            "mean": total / valid.sum(-1).clamp(min=1).cpu().numpy(),
                        }
                    )
    out = []
    for k in ks:
        for target in ("sum", "mean"):
            fix, keep, mass = [], [], []
            for r in rows:
                gold, lm = r["gold"][:k], r[target][:k]
                if not gold.any():
                    continue
                p = np.exp(lm - lm.max())
                mass.append(float((p / p.sum())[gold].sum()))
                (keep if gold[0] else fix).append(bool(gold[int(lm.argmax())]))
            out.append(
                {
                    "data": data or "demo",
                    "k": k,
                    "target": target,
                    "questions": len(rows),
                    "gold-in-k": round(100 * np.mean([r["gold"][:k].any() for r in rows]), 1),
                    "fix": round(100 * np.mean(fix), 1) if fix else None,
                    "n-fix": len(fix),
                    "keep": round(100 * np.mean(keep), 1) if keep else None,
                    "n-keep": len(keep),
                    "lm-mass-on-gold": round(float(np.mean(mass)), 3),
                }
            )
    return out


def run(data: str, variant: str, overrides: str, seed: int, steps: int, generator) -> dict:
    base = {"data-root": data, "mode": "retriever", "local-steps": steps, "seed": seed}
    s = settings_from({**base, **parse_overrides([overrides])})
    clients = resolve_clients([data]) if data else resolve_clients()
    seed_everything(seed)
    retriever = build_retriever(s)
    with open_stores(clients, s, retriever, progress=False) as stores:
        before = retrieval(clients, stores, retriever)
    start = time.perf_counter()
    train = train_local(clients, s, retriever, generator, progress=False)
    seconds = time.perf_counter() - start
    with open_stores(clients, s, retriever, progress=False) as stores:
        after = retrieval(clients, stores, retriever)
    return {
        "data": data or "demo",
        "variant": variant,
        "overrides": overrides,
        "seed": seed,
        "steps": steps,
        "before": before,
        "after": after,
        "train-seconds": round(seconds, 1),
        "ret-loss": train.get("ret-loss"),
        "skipped": train.get("skipped-examples"),
    }


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["variant"], row["steps"]), []).append(row)
    print("data | variant | seeds | recall@1 | recall@3 | recall@5 | recall@10 | MRR | s/run")
    for (data, variant, steps), rs in groups.items():
        cells = []
        for key in [f"recall@{k}" for k in KS] + ["mrr"]:
            b = statistics.mean(r["before"][key] for r in rs)
            a = statistics.mean(r["after"][key] for r in rs)
            fmt = "{:.3f}" if key == "mrr" else "{:.1f}"
            per_seed = "/".join(fmt.format(r["after"][key]) for r in rs)
            cells.append(f"{fmt.format(b)} -> {fmt.format(a)} ({per_seed})")
        secs = statistics.mean(r["train-seconds"] for r in rs)
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"{Path(data).name} | {variant} ({steps} steps) | {seeds} | {' | '.join(cells)} | "
              f"{secs:.0f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="", help="data root (default: the packaged demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--variant", action="append", default=[], help="NAME=overrides")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lsr_sweep.jsonl"))
    ap.add_argument("--summary", type=Path, help="print the table of a results file and stop")
    ap.add_argument(
        "--signal", type=int, nargs="+", help="candidate counts k: measure, no training"
    )
    ap.add_argument("--questions", type=int, default=200, help="training questions for --signal")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    if args.signal:
        generator = build_generator(settings_from({}))
        for row in signal(args.data, sorted(args.signal), args.questions, generator):
            print(json.dumps(row), flush=True)
        return 0
    variants = [v.partition("=")[::2] for v in args.variant or ["today="]]
    with tempfile.TemporaryDirectory() as stores:
        generator = build_generator(settings_from({"store-dir": stores}))
        for seed in args.seeds:
            for name, overrides in variants:
                extra = f"store-dir={shlex.quote(stores)} {overrides}"
                row = run(args.data, name, extra, seed, args.steps, generator)
                row["overrides"] = overrides
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    summary(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
