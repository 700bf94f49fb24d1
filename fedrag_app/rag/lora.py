"""FFA-LoRA (Sun et al., ICLR 2024): every A factor frozen at an init all parties share.

Averaging LoRA factors separately is not averaging updates: mean(B_i) mean(A_i) differs from
mean(B_i A_i), more so with more and more different sites. With A frozen and equal everywhere,
only B trains and travels, and mean(B_i) A = mean(B_i A) exactly: FedAvg of B is FedAvg of the
updates. A is drawn from a generator seeded by the parameter's name, so the server and every
site compute the same A without sending it (and half of the adapter's bytes stay home).
"""

from __future__ import annotations

import math
import zlib

import torch


def share_frozen_a(module: torch.nn.Module, reinit: bool = True) -> int:
    """Freeze every ``lora_A`` weight; with ``reinit``, redraw it as PEFT does (Kaiming uniform,
    bound 1/sqrt(fan_in)) but from the parameter's name alone. Returns how many were frozen."""
    frozen = 0
    for name, p in module.named_parameters():
        if "lora_A" not in name:
            continue
        if reinit:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            bound = 1 / math.sqrt(p.shape[1])
            with torch.no_grad():
                drawn = torch.empty(p.shape, dtype=torch.float32).uniform_(
                    -bound, bound, generator=g
                )
                p.copy_(drawn.to(p.dtype))
        p.requires_grad_(False)
        frozen += 1
    if not frozen:
        raise ValueError("lora-aggregation = 'ffa' needs LoRA adapters (no lora_A weights found)")
    return frozen
