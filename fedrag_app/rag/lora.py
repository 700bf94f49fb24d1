"""Exact FedAvg of LoRA factors: FFA-LoRA, and alternating the factor that trains.

FFA-LoRA (Sun et al., ICLR 2024): every A factor frozen at an init all parties share.

Averaging LoRA factors separately is not averaging updates: mean(B_i) mean(A_i) differs from
mean(B_i A_i), more so with more and more different sites. With A frozen and equal everywhere,
only B trains and travels, and mean(B_i) A = mean(B_i A) exactly: FedAvg of B is FedAvg of the
updates. A is drawn from a generator seeded by the parameter's name, so the server and every
site compute the same A without sending it (and half of the adapter's bytes stay home).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

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


def trained_factor(aggregation: str, server_round: int) -> str | None:
    """``lora-aggregation = alternate``: in federated round r, only ``lora_B`` trains when r is
    odd and only ``lora_A`` when r is even (alternating optimisation, as in RoLoRA, Chen et
    al., NeurIPS 2025, which also sends only the trained factor; here both travel). Every site
    starts the round from the same global A and B, so with one factor held fixed the mean of
    the sites' B_i A (or B A_i) is the product of the means: FedAvg is exact, and unlike
    FFA-LoRA neither factor stays at its random init. B trains first, since A gets no gradient
    while B is PEFT's zero init. ``None`` (both train): every other mode, and centralized runs
    (``server_round`` 0), where there is nothing to average."""
    if aggregation != "alternate" or server_round <= 0:
        return None
    return "lora_B" if server_round % 2 else "lora_A"


@contextmanager
def only_factor(
    params: dict[str, torch.nn.Parameter], factor: str | None
) -> Iterator[dict[str, torch.nn.Parameter]]:
    """The parameters of ``factor`` (all of them when ``None``); the other LoRA factor is
    frozen meanwhile, so backward spends nothing on it, and unfrozen again afterwards."""
    if factor is None:
        yield params
        return
    other = "lora_A" if factor == "lora_B" else "lora_B"
    held = [p for name, p in params.items() if other in name and p.requires_grad]
    for p in held:
        p.requires_grad_(False)
    try:
        yield {name: p for name, p in params.items() if other not in name}
    finally:
        for p in held:
            p.requires_grad_(True)
