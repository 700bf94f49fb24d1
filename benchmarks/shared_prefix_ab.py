"""The shared prompt prefix run once against every row running it, interleaved in one process.

Two separate processes (``ralt_throughput.py --no-shared-prefix``) differ by more than the
effect on these shared, noisy cores; alternating the two paths over the same length-grouped
batches of 4 (forward and backward, the generator's answer loss) cancels the drift.
Run: python benchmarks/shared_prefix_ab.py [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import torch
from ralt_throughput import examples

from fedrag_app.config import Settings
from fedrag_app.finetune.loop import length_grouped_batches
from fedrag_app.finetune.ralt import RaltLoss
from fedrag_app.task import build_generator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = build_generator(Settings())
    loss_fn = RaltLoss(generator, 384)
    data = examples(48)
    batches = list(
        itertools.islice(length_grouped_batches(data, loss_fn.length, 4, random.Random(0)), 12)
    )
    seconds = {True: 0.0, False: 0.0}
    for _ in range(args.rounds):
        for share in (False, True, True, False):
            for batch in batches[:6]:
                encoded = [loss_fn.encode(e) for e in batch]
                start = time.perf_counter()
                logp, valid = generator.answer_token_logprobs(encoded, share_prefix=share)
                (-logp.sum() / valid.sum()).backward()
                seconds[share] += time.perf_counter() - start
    tokens = sum(len(loss_fn.encode(e)[0]) for b in batches[:6] for e in b)
    saved = sum((len(b) - 1) * loss_fn.shared(b) for b in batches[:6])
    print(f"{args.threads} threads, {tokens} tokens in 6 batches of 4, {saved} not computed")
    print(
        f"every row its prefix: {seconds[False]:.1f} s; shared prefix once: {seconds[True]:.1f} s"
    )
    print(f"speed-up {seconds[False] / seconds[True]:.2f}x")


if __name__ == "__main__":
    main()
