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
from transformers import get_constant_schedule, get_linear_schedule_with_warmup

from fedrag_app.finetune.privacy import DpSettings, PrivateOptimizer

T = TypeVar("T")
S = TypeVar("S")


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    lr: float
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    # > 0: a batch runs forward and backward in pieces of at most this many padded tokens,
    # each weighted so that the summed gradient IS the whole batch's (memory grows with the
    # tokens of one pass, not with the batch); losses without ``length``/``weight`` run whole
    micro_batch_tokens: int = 0
    autocast_bf16: bool = False
    proximal_mu: float = 0.0
    # "sgd": plain SGD, so a round's update is lr x the summed gradients, what a server
    # optimizer (FedAdam, FedYogi, FedAdagrad) expects as its pseudo-gradient (Reddi et al.,
    # ICLR 2021); "adamw" normalises each site's steps on its own
    optimizer: str = "adamw"
    progress: bool = True
    desc: str = "train"
    # Where these steps sit in a longer schedule: a federated client in round r of R runs
    # steps [(r-1)*steps, r*steps) of one warmup-and-decay over R*steps, as one long run would.
    schedule_start: int = 0
    schedule_total: int = 0  # 0 = just these steps
    # "constant": every step at ``lr`` (no warmup, no decay), for sites whose updates a server
    # optimizer rescales and schedules (``server-lr-schedule``)
    schedule: str = "linear"
    # DP-SGD (privacy.py): each step takes ONE Poisson batch, clipped per example and noised;
    # max_grad_norm, grad_accum and proximal_mu do not apply then
    dp: DpSettings | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(
    items: Sequence[T], length: Callable[[T], int], batch_size: int, rng: random.Random
) -> Iterator[list[T]]:
    """Endless batches of similar lengths (little padding), in random order, epoch after epoch,
    over items that are ready to train on."""
    return prepared_batches(items, list, length, batch_size, batch_size * 32, rng)


def prepared_batches(
    items: Sequence[S],
    prepare: Callable[[list[S]], list[T]],
    length: Callable[[T], int],
    batch_size: int,
    window: int,
    rng: random.Random,
    run_order: tuple[int, int] | None = None,
) -> Iterator[list[T]]:
    """Endless full batches of similar lengths that prepare only what they yield.

    The cheap items (QA pairs) are shuffled; ``prepare`` (retrieve, build examples, tokenize,
    drop what does not fit) runs on ``window`` of them at a time, when the loop reaches them.
    A round of S steps then costs S steps' examples, whatever the size of the site's data.
    A window's last partial batch carries over into the next, so every batch is full (unless
    the whole data set holds fewer examples than one batch).

    ``run_order`` = (seed, start): the items follow one fixed sequence of shuffles (epoch e
    shuffled by seed and e) from position ``start`` on, so that successive calls, a federated
    site's rounds, continue one pass over the data instead of each drawing from a fresh shuffle.
    """
    if not items:
        raise ValueError("no training examples")
    carry: list[T] = []
    epoch, skip = divmod(run_order[1], len(items)) if run_order else (0, 0)
    while True:
        order = list(items)
        (random.Random(f"{run_order[0]}:{epoch}") if run_order else rng).shuffle(order)
        order, partial, skip, epoch = order[skip:], skip > 0, 0, epoch + 1
        produced = yielded = False
        for start in range(0, len(order), window):
            ready = carry + prepare(order[start : start + window])
            produced = produced or bool(ready)
            ready.sort(key=length)
            full = len(ready) // batch_size * batch_size
            batches = [ready[i : i + batch_size] for i in range(0, full, batch_size)]
            carry = ready[full:]
            rng.shuffle(batches)
            yielded = yielded or bool(batches)
            yield from batches
        if not produced and not partial:
            raise ValueError("no training example fits max-seq-len")
        if not yielded:  # fewer examples than one batch in the whole data set
            batch, carry = carry, []
            yield batch


def micro_batches(batch: list[T], loss_fn: object, max_tokens: int) -> list[tuple[list[T], float]]:
    """``batch`` in consecutive pieces of at most ``max_tokens`` padded tokens (at least one
    item each), with each piece's share of the batch's mean: ``loss_fn.weight(items)`` is what
    its mean divides by (answer tokens, examples), ``loss_fn.length(item)`` an item's tokens,
    ``loss_fn.shared(items)`` (optional) the leading tokens a pass runs once for all items.
    The shares make sum(share x piece loss) exactly the whole batch's loss."""
    length, weight = getattr(loss_fn, "length", None), getattr(loss_fn, "weight", None)
    if max_tokens <= 0 or len(batch) < 2 or length is None or weight is None:
        return [(batch, 1.0)]
    shared = getattr(loss_fn, "shared", lambda items: 0)(batch)  # a piece shares at least these
    pieces: list[list[T]] = [[]]
    longest = 0
    for item in batch:
        n = length(item)
        rows = len(pieces[-1]) + 1
        if pieces[-1] and shared + rows * (max(longest, n) - shared) > max_tokens:
            pieces.append([])
            longest = 0
        pieces[-1].append(item)
        longest = max(longest, n)
    if len(pieces) == 1:
        return [(batch, 1.0)]
    total = weight(batch)
    return [(piece, weight(piece) / total) for piece in pieces]


def run_loop(
    params: dict[str, torch.nn.Parameter],
    batches: Iterator[T],
    loss_fn: Callable[[T], tuple[torch.Tensor, int]],
    cfg: LoopSettings,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    module: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps; ``loss_fn`` returns (mean loss, tokens processed).

    With ``cfg.dp`` the loss must be the mean of per-example losses and ``module`` the model
    ``loss_fn`` runs: Opacus hooks it for per-example gradients during these steps only.

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
    if cfg.dp is not None and (module is None or anchor is not None):
        raise ValueError("DP-SGD needs the module the loss runs, and no proximal term")
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    if optimizer_state and cfg.optimizer == "adamw":
        _load_adam_state(optimizer, params, optimizer_state)
    total = max(cfg.schedule_total, cfg.schedule_start + cfg.steps)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # lets the scheduler start mid-schedule
    scheduler = (
        get_constant_schedule(optimizer)
        if cfg.schedule == "constant"
        else get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * total), total, last_epoch=cfg.schedule_start - 1
        )
    )
    autocast = (
        torch.autocast(trainable[0].device.type, dtype=torch.bfloat16)
        if cfg.autocast_bf16
        else contextlib.nullcontext()
    )
    losses: list[float] = []  # one per step that saw examples
    tokens = steps_done = 0
    start = time.perf_counter()
    private = PrivateOptimizer(module, optimizer, cfg.dp) if cfg.dp is not None else None
    try:
        bar = tqdm(range(cfg.steps), desc=cfg.desc, unit="step", disable=not cfg.progress)
        for _ in bar:
            if private is not None:  # one Poisson batch, in chunks, then clip + noise + step
                batch = next(batches)
                parts = [
                    batch[i : i + cfg.dp.micro_batch]
                    for i in range(0, len(batch), cfg.dp.micro_batch)
                ]
                scale = [len(p) / len(batch) for p in parts]
            else:
                parts = [next(batches) for _ in range(cfg.grad_accum)]
                scale = [1 / cfg.grad_accum] * cfg.grad_accum
            step_loss = 0.0
            for part, weight in zip(parts, scale, strict=True):
                # DP: Opacus's own chunks (dp.micro_batch) above, never split here
                budget = 0 if private is not None else cfg.micro_batch_tokens
                for i, (piece, share) in enumerate(micro_batches(part, loss_fn, budget)):
                    with autocast:
                        loss, n_tokens = loss_fn(piece)
                    loss = loss * share if share != 1.0 else loss
                    if anchor is not None and i == 0:  # once per batch, whatever its pieces
                        prox = sum(
                            ((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True)
                        )
                        loss = loss + cfg.proximal_mu / 2 * prox
                    # DP: per-example gradients, not divided by the chunk count (Opacus averages)
                    (loss if private is not None else loss / cfg.grad_accum).backward()
                    step_loss += loss.item() * weight
                    tokens += n_tokens
            if private is not None:
                private.step(sum(len(p) for p in parts))
            else:
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            steps_done += 1
            if parts:
                losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.4f}")
    finally:
        if private is not None:
            private.close()
    seconds = time.perf_counter() - start
    if optimizer_state is not None and cfg.optimizer == "adamw":
        optimizer_state.update(_adam_state(optimizer, params))
    adam_steps = max((float(s["step"]) for s in optimizer.state.values() if s), default=0.0)
    tail = losses[-max(1, len(losses) // 4) :] or [0.0]
    return {
        "loss": sum(tail) / len(tail),
        "loss_first": losses[0] if losses else 0.0,
        "steps": steps_done,
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
