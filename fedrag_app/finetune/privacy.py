"""Record-level differential privacy (DP-SGD) with Opacus: each site's training run is
(epsilon, delta)-DP with respect to any one of its QA pairs.

Opacus does the mechanism and the accounting: ``GradSampleModule`` computes per-example
gradients of the trainable (LoRA) weights, ``DPOptimizer`` clips each to ``dp-clip-norm`` and
adds Gaussian noise, and its RDP accountant turns (noise, sampling rate, steps) into epsilon.
What this module adds is what Opacus's DataLoader path would otherwise hide: Poisson-sampled
batches over our own examples (the sampling the accountant assumes), and a ledger of every
private step a site has taken in a run, so the epsilon it reports covers all its rounds and a
site can refuse a round that would exceed its own budget.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")
DP_WEIGHT = "dp-weight"  # with dp=client every site sends 1.0: the accounted mean is unweighted
# Opacus hooks LoRA layers whose inputs are frozen activations; torch warns at every backward
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class BudgetExceeded(Exception):
    """The round would take this site past the epsilon its policy allows."""


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float  # each example joins each step's batch with this probability
    expected_batch: int  # sample_rate x examples: Opacus divides the noisy sum by it
    micro_batch: int  # a large Poisson batch is processed in chunks of this size


def noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, fixed: float = 0.0
) -> float:
    """``fixed`` if > 0, else the smallest noise that keeps ``steps`` steps within epsilon."""
    if fixed > 0:
        return fixed
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=max(steps, 1),
            accountant="rdp",
        )
    )


@dataclass
class PrivacyLedger:
    """Every private step a site took in this run, as (noise, sample rate, steps) entries:
    Opacus's RDP accountant composes them into the epsilon spent so far."""

    delta: float
    budget: float = 0.0  # the site's max-epsilon (0: none)
    entries: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, extra: tuple[float, float, int] | None = None) -> float:
        from opacus.accountants import RDPAccountant

        history = [*self.entries, *([extra] if extra else [])]
        if not history:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(z, q, n) for z, q, n in history]
        return float(accountant.get_epsilon(self.delta))

    def plan(self, dp: DpSettings, steps: int) -> None:
        """Refuse BEFORE training if these steps would exceed the site's budget."""
        if self.budget > 0:
            after = self.epsilon((dp.noise_multiplier, dp.sample_rate, steps))
            if after > self.budget:
                raise BudgetExceeded(
                    f"{steps} more DP-SGD steps would spend epsilon {after:.3f} (delta "
                    f"{self.delta:g}), over this site's max-epsilon {self.budget:g}"
                )

    def record(self, dp: DpSettings, steps: int) -> None:
        if steps > 0:
            self.entries.append((dp.noise_multiplier, dp.sample_rate, steps))

    def to_lists(self) -> dict[str, list]:
        return {
            "noise": [e[0] for e in self.entries],
            "rate": [e[1] for e in self.entries],
            "steps": [e[2] for e in self.entries],
        }

    @classmethod
    def from_lists(cls, data: dict, delta: float, budget: float = 0.0) -> PrivacyLedger:
        entries = [
            (float(z), float(q), int(n))
            for z, q, n in zip(
                data.get("noise", []), data.get("rate", []), data.get("steps", []), strict=True
            )
        ]
        return cls(delta, budget, entries)


def poisson_batches(
    items: Sequence[T],
    rate: float,
    rng: random.Random,
    prepare: Callable[[list[T]], list] | None = None,
) -> Iterator[list]:
    """Endless batches, each item included independently with probability ``rate``: the
    sampling under which the accountant's epsilon holds (fixed-size shuffled batches are not).
    A batch may be empty; the step then releases noise only.

    ``prepare`` turns the sampled items (QA pairs) into examples when the batch is drawn, so
    only sampled pairs are retrieved and tokenized; it may drop one that does not fit, which
    the guarantee allows (a record then adds nothing, less than the clip norm it may add).
    """
    if not items:
        raise ValueError("no training examples")
    while True:
        sampled = [x for x in items if rng.random() < rate]
        yield prepare(sampled) if prepare is not None and sampled else sampled


class PrivateOptimizer:
    """Per-example clipping and Gaussian noise (Opacus) in front of an optimizer.

    Hooks go on ``module``'s trainable layers for the life of this object: ``close()`` removes
    them, so a model reused by the next message trains without them.
    """

    def __init__(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DpSettings
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # strict=False: frozen layers Opacus has no per-example rule for (RMSNorm) are fine,
        # only trainable ones need one (LoRA's are nn.Linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(module, batch_first=True, strict=False)
            self.optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clip_norm,
                expected_batch_size=dp.expected_batch,
                loss_reduction="mean",
            )
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(self, examples: int) -> None:
        """``examples`` = 0: an empty Poisson batch; the step still adds the noise."""
        if examples == 0:
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.module._close()
