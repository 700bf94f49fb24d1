"""RALT training throughput: this repo's loop vs. a fed-rag-style baseline, side by side.

Both train SmolLM2-135M-Instruct with the same LoRA (r=8 on q_proj, v_proj) on the SAME RALT
examples (demo questions, each with one retrieved chunk), same batch size and steps.

- ours: dynamic padding, length-grouped batches, loss on answer tokens only (our RaltLoss).
- baseline: transformers Trainer, a collator padding every example to max-len, loss over the
  whole sequence (labels = input ids), as fed-rag's RALT trainer does.
- fair: the strongest off-the-shelf recipe: transformers Trainer grouping by length
  (``train_sampling_strategy="group_by_length"`` in transformers 5), a collator padding to the
  longest example of the batch, labels on answer tokens only.

Throughput = real (non-pad) tokens of the examples trained per second (ours runs the prompt
template the rows of a pass share once; MFU counts only the tokens computed); each run is a separate
process so peak RSS is its own. Model FLOPs utilisation (MFU) = tokens/s x FLOPs per token over
this machine's measured fp32 matmul peak (all threads, 2048 x 2048 matmuls); FLOPs per token
~ 4 x the model's weights for LoRA training (forward 2N, backward to the activations 2N; the
frozen weights get no gradient). Run: `make bench` (or python benchmarks/ralt_throughput.py).
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


def run(
    impl: str,
    steps: int,
    batch: int,
    bf16: bool,
    checkpointing: bool = False,
    micro: int = 0,
    share_prefix: bool = True,
) -> dict:
    import torch

    from fedrag_app.config import Settings
    from fedrag_app.finetune.loop import LoopSettings, length_grouped_batches, run_loop
    from fedrag_app.finetune.ralt import RaltLoss
    from fedrag_app.task import build_generator

    torch.manual_seed(0)
    data = examples(steps * batch)
    generator = build_generator(Settings(gradient_checkpointing=checkpointing))
    generator.share_prefix = generator.share_prefix and share_prefix  # never where it is off
    loss_fn = RaltLoss(generator, MAX_LEN)
    computed = None
    if impl == "ours":
        batches = length_grouped_batches(data, loss_fn.length, batch, random.Random(0))
        res = run_loop(generator.trainable_parameters(), batches, loss_fn,
                       LoopSettings(steps=steps, lr=3e-4, autocast_bf16=bf16, progress=False,
                                    micro_batch_tokens=micro))  # fmt: skip
        tokens, seconds = res["tokens"], res["seconds"]
        computed = tokens - loss_fn.tokens_not_computed
    else:
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        pad = generator.tokenizer.pad_token_id
        fair = impl == "fair"
        rows = [{"input_ids": loss_fn.encode(e)[0], "answer_labels": loss_fn.encode(e)[1]}
                for e in data]  # fmt: skip
        counted = {"tokens": 0}

        def collate(features):
            width = max(len(f["input_ids"]) for f in features) if fair else MAX_LEN
            ids = torch.full((len(features), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, f in enumerate(features):
                ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[i, : len(f["input_ids"])] = 1
            counted["tokens"] += int(mask.sum())
            labels = ids.clone()
            labels[mask == 0] = -100
            if fair:  # answer tokens only, as RaltLoss
                labels.fill_(-100)
                for i, f in enumerate(features):
                    labels[i, : len(f["answer_labels"])] = torch.tensor(f["answer_labels"])
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        args = TrainingArguments(
            output_dir="/tmp/ralt-baseline", per_device_train_batch_size=batch, max_steps=steps,
            learning_rate=3e-4, report_to=[], save_strategy="no", logging_strategy="no",
            use_cpu=True, bf16=bf16, dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if fair else "random",
            length_column_name="length",
        )  # fmt: skip
        if fair:
            rows = [{**r, "length": len(r["input_ids"])} for r in rows]
        trainer = Trainer(model=generator.model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=collate)  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        tokens = counted["tokens"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "impl": impl,
        "weights": sum(p.numel() for p in generator.model.parameters()),
        "tokens": tokens,
        "computed_tokens": tokens if computed is None else computed,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["ours", "fair", "baseline"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="ours only")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="ours only (default: the app's default; 0 = whole batches)")  # fmt: skip
    parser.add_argument("--no-shared-prefix", action="store_true",
                        help="ours only: run every row's prompt template itself")  # fmt: skip
    args = parser.parse_args()
    if args.micro_batch_tokens is None:
        from fedrag_app.config import Settings

        args.micro_batch_tokens = Settings().micro_batch_tokens
    if args.impl:
        print(json.dumps(run(args.impl, args.steps, args.batch, args.bf16,
                             args.gradient_checkpointing, args.micro_batch_tokens,
                             not args.no_shared_prefix)))  # fmt: skip
        return
    results = {}
    for impl in ("baseline", "fair", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--micro-batch-tokens",
            str(args.micro_batch_tokens),
        ]
        cmd += ["--bf16"] if args.bf16 else []
        cmd += ["--no-shared-prefix"] if args.no_shared_prefix else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    peak = matmul_peak()
    print(f"machine: {peak / 1e9:.1f} GFLOP/s fp32 matmul peak ({torch_threads()} threads)")
    print(
        f"ours: micro-batch-tokens={args.micro_batch_tokens} (0 = whole batches), shared "
        f"prefix {'off' if args.no_shared_prefix else 'run once per pass'}"
    )
    for r in results.values():
        # MFU counts the FLOPs done: tokens a pass ran once for all its rows count once
        mfu = r["computed_tokens"] / r["seconds"] * 4 * r["weights"] / peak
        print(
            f"{r['impl']:>8}: {r['tokens_per_s']:7.1f} tokens/s ({r['tokens']} tokens in "
            f"{r['seconds']:.1f} s, {r['computed_tokens']} computed), peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, MFU {100 * mfu:.1f}%"
        )
    ours = results["ours"]["tokens_per_s"]
    print(f"speed-up: {ours / results['baseline']['tokens_per_s']:.2f}x the fed-rag-style baseline")
    print(f"speed-up: {ours / results['fair']['tokens_per_s']:.2f}x the fair Trainer (target 1.3x)")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of fp32 matmuls on all threads: the physical limit MFU is measured against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
