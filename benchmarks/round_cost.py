"""A round's cost against the size of a site's data: one demo site against the same site
with 10x its corpus and 10x its QA pairs, each training `local-steps` steps (stores built
first, not timed).

Run: python benchmarks/round_cost.py [--scale 10] [--rounds 3] [-c 'mode=both ...']
     [--out benchmarks/results/round_cost.json]

The 10x site repeats every document and QA pair with new ids and a marker in the text, so the
store holds 10x the chunks and the training set 10x the pairs. Each "round" is what a
ClientApp's train handler does with the data: `task.train_local` (open the store, check its
fingerprint, retrieve, tokenize, train). Models load once per site, as a warm ClientApp's do.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedrag_app.config import parse_overrides, settings_from
from fedrag_app.data import ClientData, demo_root, load_corpus, load_qa, write_jsonl
from fedrag_app.task import build_generator, build_retriever, open_store, train_local


def scaled_site(root: Path, scale: int) -> ClientData:
    src = demo_root() / "jargon"
    out = root / f"jargon-x{scale}"
    docs = load_corpus(src / "corpus.jsonl")
    write_jsonl(out / "corpus.jsonl", [
        {"id": f"{d.id}~{k}" if k else d.id, "title": d.title,
         "text": d.text if not k else f"{d.text} (copy {k})"}
        for k in range(scale) for d in docs
    ])  # fmt: skip
    for split in ("train", "eval"):
        pairs = load_qa(src / f"{split}.jsonl")
        write_jsonl(out / f"{split}.jsonl", [
            {"question": p.question if not k else f"{p.question} (copy {k})", "answers": list(p.answers)}
            for k in range(scale if split == "train" else 1) for p in pairs
        ])  # fmt: skip
    return ClientData(out.name, out)


def rounds(client: ClientData, s, n: int) -> list[float]:
    retriever, generator = build_retriever(s), build_generator(s)
    with open_store(client, s, retriever, progress=True):
        pass  # build (or reuse) the store: not part of a round
    seconds = []
    for r in range(1, n + 1):
        start = time.perf_counter()
        train_local(
            [client],
            s.replace(seed=s.seed + r),
            retriever,
            generator,
            progress=False,
            server_round=r,
        )
        seconds.append(round(time.perf_counter() - start, 2))
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--config", action="append")
    parser.add_argument("--out", default="benchmarks/results/round_cost.json")
    args = parser.parse_args()
    s = settings_from(parse_overrides(args.config))
    with tempfile.TemporaryDirectory() as tmp:
        s = s.replace(store_dir=s.store_dir or str(Path(tmp) / "stores"))
        small = ClientData("jargon", demo_root() / "jargon")
        big = scaled_site(Path(tmp), args.scale)
        result = {"config": " ".join(args.config or []), "scale": args.scale,
                  "demo site": rounds(small, s, args.rounds),
                  f"{args.scale}x site": rounds(big, s, args.rounds)}  # fmt: skip
    a, b = (sorted(v)[len(v) // 2] for v in (result["demo site"], result[f"{args.scale}x site"]))
    result["ratio (median round)"] = round(b / a, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
