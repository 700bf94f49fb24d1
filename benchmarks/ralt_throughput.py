"""RALT training throughput: this repo's loop vs. a fed-rag-style baseline, side by side.

Both train SmolLM2-135M-Instruct with the same LoRA (r=8 on q_proj, v_proj) on the SAME RALT
examples (demo questions, each with one retrieved chunk), same batch size and steps.

- ours: dynamic padding, length-grouped batches, loss on answer tokens only (our RaltLoss).
- baseline: transformers Trainer, a collator padding every example to max-len, loss over the
  whole sequence (labels = input ids), as fed-rag's RALT trainer does.

Throughput = real (non-pad) tokens processed per second of training; each run is a separate
process so peak RSS is its own. Run: `make bench` (or python benchmarks/ralt_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

MAX_LEN = 384


def examples(n: int):
    from fedrag_app.config import Settings
    from fedrag_app.data import resolve_clients
    from fedrag_app.finetune.ralt import ralt_examples
    from fedrag_app.task import build_retriever, open_store

    s = Settings()
    client = resolve_clients()[0]
    pairs = client.qa("train")[: (n + 2) // 3]
    retriever = build_retriever(s)
    with open_store(client, s, retriever, progress=False) as store:
        hits = store.search(retriever.encode_queries([p.question for p in pairs]), 3)
    return ralt_examples(pairs, hits, 3)[:n]


def run(impl: str, steps: int, batch: int, bf16: bool) -> dict:
    import torch

    from fedrag_app.config import Settings
    from fedrag_app.finetune.loop import LoopSettings, length_grouped_batches, run_loop
    from fedrag_app.finetune.ralt import RaltLoss
    from fedrag_app.task import build_generator

    torch.manual_seed(0)
    data = examples(steps * batch)
    generator = build_generator(Settings())
    loss_fn = RaltLoss(generator, MAX_LEN)
    if impl == "ours":
        batches = length_grouped_batches(data, loss_fn.length, batch, random.Random(0))
        res = run_loop(generator.trainable_parameters(), batches, loss_fn,
                       LoopSettings(steps=steps, lr=3e-4, autocast_bf16=bf16, progress=False))  # fmt: skip
        tokens, seconds = res["tokens"], res["seconds"]
    else:
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        pad = generator.tokenizer.pad_token_id
        rows = [{"input_ids": loss_fn.encode(e)[0]} for e in data]
        counted = {"tokens": 0}

        def collate(features):
            ids = torch.full((len(features), MAX_LEN), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, f in enumerate(features):
                ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[i, : len(f["input_ids"])] = 1
            counted["tokens"] += int(mask.sum())
            labels = ids.clone()
            labels[mask == 0] = -100
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        args = TrainingArguments(
            output_dir="/tmp/ralt-baseline", per_device_train_batch_size=batch, max_steps=steps,
            learning_rate=3e-4, report_to=[], save_strategy="no", logging_strategy="no",
            use_cpu=True, bf16=bf16, dataloader_num_workers=0, remove_unused_columns=False,
        )  # fmt: skip
        trainer = Trainer(model=generator.model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=collate)  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        tokens = counted["tokens"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "impl": impl,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "baseline"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run(args.impl, args.steps, args.batch, args.bf16)))
        return
    results = {}
    for impl in ("baseline", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        out = subprocess.run(
            cmd + (["--bf16"] if args.bf16 else []), capture_output=True, text=True, check=True
        )
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        print(
            f"{r['impl']:>8}: {r['tokens_per_s']:7.1f} tokens/s ({r['tokens']} tokens in {r['seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    ratio = results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    print(f"speed-up: {ratio:.2f}x tokens/s (target >= 1.5x)")


if __name__ == "__main__":
    main()
