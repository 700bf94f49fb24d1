"""The optimisation loop shared by every method: schedule, accumulation, clipping, autocast,
the FedProx proximal term, optional carried-over AdamW moments, and honest loss/throughput
reporting."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

T = TypeVar("T")


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    lr: float
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    autocast_bf16: bool = False
    proximal_mu: float = 0.0
    progress: bool = True
    desc: str = "train"
    # Where these steps sit in a longer schedule: a federated client in round r of R runs
    # steps [(r-1)*steps, r*steps) of one warmup-and-decay over R*steps, as one long run would.
    schedule_start: int = 0
    schedule_total: int = 0  # 0 = just these steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(
    items: Sequence[T], length: Callable[[T], int], batch_size: int, rng: random.Random
) -> Iterator[list[T]]:
    """Endless batches of similar lengths (little padding), in random order, epoch after epoch."""
    if not items:
        raise ValueError("no training examples")
    window = batch_size * 32
    while True:
        order = list(items)
        rng.shuffle(order)
        batches: list[list[T]] = []
        for start in range(0, len(order), window):
            mega = sorted(order[start : start + window], key=length)
            batches.extend(mega[i : i + batch_size] for i in range(0, len(mega), batch_size))
        rng.shuffle(batches)
        yield from batches


def run_loop(
    params: dict[str, torch.nn.Parameter],
    batches: Iterator[T],
    loss_fn: Callable[[T], tuple[torch.Tensor, int]],
    cfg: LoopSettings,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps; ``loss_fn`` returns (mean loss, tokens processed).

    With ``proximal_mu`` > 0 the loss adds mu/2 * ||w - w_start||^2 over the trained
    parameters (FedProx), w_start being the weights received from the server.

    ``optimizer_state`` (parameter name -> tensor) carries AdamW's moments and step count from
    one call to the next: these parameters' entries are loaded before the first step and
    updated after the last; entries of other parameters are left alone.
    A federated client passes its own, so a new round does not restart Adam from zero, whose
    bias-corrected first steps move every weight by about the full learning rate.
    """
    trainable = [p for p in params.values() if p.requires_grad]
    if cfg.steps <= 0 or not trainable:
        keys = ("loss", "loss_first", "steps", "tokens", "seconds", "optimizer_steps", "lr")
        return dict.fromkeys(keys, 0.0)
    anchor = [p.detach().clone() for p in trainable] if cfg.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    if optimizer_state:
        _load_adam_state(optimizer, params, optimizer_state)
    total = max(cfg.schedule_total, cfg.schedule_start + cfg.steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # lets the scheduler start mid-schedule
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total), total, last_epoch=cfg.schedule_start - 1
    )
    autocast = (
        torch.autocast(trainable[0].device.type, dtype=torch.bfloat16)
        if cfg.autocast_bf16
        else contextlib.nullcontext()
    )
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=cfg.desc, unit="step", disable=not cfg.progress)
    for _ in bar:
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            with autocast:
                loss, n_tokens = loss_fn(next(batches))
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
                loss = loss + cfg.proximal_mu / 2 * prox
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            tokens += n_tokens
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
    seconds = time.perf_counter() - start
    if optimizer_state is not None:
        optimizer_state.update(_adam_state(optimizer, params))
    adam_steps = max((float(s["step"]) for s in optimizer.state.values()), default=0.0)
    tail = losses[-max(1, len(losses) // 4) :]
    return {
        "loss": sum(tail) / len(tail),
        "loss_first": losses[0],
        "steps": len(losses),
        "tokens": tokens,
        "seconds": seconds,
        "optimizer_steps": adam_steps,  # > steps when moments were carried over
        "lr": cfg.lr,  # the peak lr, so a run's history shows what each client trained with
    }


_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _adam_state(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name, on CPU, detached."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        state = optimizer.state.get(p)
        for key in _ADAM_KEYS if state else ():
            out[f"{name}.{key}"] = state[key].detach().to("cpu", copy=True).reshape(-1)
    return out


def _load_adam_state(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    saved: dict[str, torch.Tensor],
) -> None:
    """Inverse of ``_adam_state``; a parameter whose saved state is missing or has another
    shape starts fresh, so a changed model never fails on a stale state."""
    for name, p in params.items():
        step, avg, sq = (saved.get(f"{name}.{key}") for key in _ADAM_KEYS)
        if not p.requires_grad or step is None or avg is None or sq is None:
            continue
        if avg.numel() != p.numel():
            continue
        optimizer.state[p] = {
            "step": step.reshape(()).to(torch.float32).clone(),
            "exp_avg": avg.reshape(p.shape).to(p.device, p.dtype).clone(),
            "exp_avg_sq": sq.reshape(p.shape).to(p.device, p.dtype).clone(),
        }
