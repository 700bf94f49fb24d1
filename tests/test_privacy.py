"""Record-level DP-SGD (Opacus): clipping, noise and epsilon measured, in the shared loop."""

import math
import random

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedrag_app.finetune.privacy import (
    BudgetExceeded,
    DpSettings,
    PrivacyLedger,
    PrivateOptimizer,
    noise_multiplier,
    poisson_batches,
)


def _dp(z: float, clip: float, expected: int) -> DpSettings:
    return DpSettings(z, clip, sample_rate=0.5, expected_batch=expected, micro_batch=expected)


def _per_example_grads(model, xs, ys):
    grads = []
    for x, y in zip(xs, ys, strict=True):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[None]), y[None], reduction="sum").backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    model.zero_grad()
    return grads


def test_each_example_gradient_is_clipped_to_the_clip_norm():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    xs, ys = torch.randn(8, 6) * 10, torch.randn(8, 3) * 10  # gradients far above the norm
    wanted = [g * min(1.0, 0.5 / g.norm()) for g in _per_example_grads(model, xs, ys)]
    assert all(g.norm() > 0.5 for g in _per_example_grads(model, xs, ys))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    private = PrivateOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), _dp(0.0, 0.5, 8))
    try:
        # the loss is the MEAN of per-example losses, as RaltLoss(per_example=True) returns
        loss = ((model(xs) - ys) ** 2).sum(dim=1).mean()  # one forward over the batch
        loss.backward()
        private.step(8)
    finally:
        private.close()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = before - after  # SGD with lr 1: the clipped mean gradient
    assert torch.allclose(step, torch.stack(wanted).sum(0) / 8, atol=1e-5)
    assert all(g.norm() <= 0.5 + 1e-6 for g in wanted)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )


def test_the_noise_has_the_configured_standard_deviation_even_on_an_empty_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 100, bias=False)
    before = model.weight.detach().clone()
    private = PrivateOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), _dp(2.0, 0.5, 4))
    try:
        private.step(0)  # a Poisson batch that drew no example: noise only
    finally:
        private.close()
    noise = (before - model.weight.detach()).reshape(-1)
    expected = 2.0 * 0.5 / 4  # noise multiplier x clip norm / expected batch size
    assert noise.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 0.01


def test_epsilon_grows_with_steps_and_matches_opacus_accountant():
    ledger = PrivacyLedger(delta=1e-5)
    eps = []
    for _ in range(3):
        ledger.record(_dp(1.1, 1.0, 4), 5)
        eps.append(ledger.epsilon())
    assert eps[0] < eps[1] < eps[2]
    direct = RDPAccountant()
    for _ in range(15):
        direct.step(noise_multiplier=1.1, sample_rate=0.5)
    assert eps[-1] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    back = PrivacyLedger.from_lists(ledger.to_lists(), 1e-5)
    assert back.epsilon() == pytest.approx(eps[-1])


def test_the_noise_derived_from_a_target_epsilon_meets_it():
    z = noise_multiplier(8.0, 1e-5, sample_rate=4 / 360, steps=30)
    ledger = PrivacyLedger(1e-5, entries=[(z, 4 / 360, 30)])
    assert 7.0 < ledger.epsilon() <= 8.0 + 0.01
    assert noise_multiplier(8.0, 1e-5, 0.1, 30, fixed=3.0) == 3.0  # set: it wins


def test_a_site_budget_refuses_the_round_that_would_exceed_it():
    ledger = PrivacyLedger(1e-5, budget=1.0, entries=[(1.0, 0.5, 5)])
    with pytest.raises(BudgetExceeded, match="max-epsilon 1"):
        ledger.plan(_dp(1.0, 1.0, 4), 5)
    PrivacyLedger(1e-5, budget=1e6).plan(_dp(1.0, 1.0, 4), 5)


def test_poisson_batches_include_each_example_independently():
    batches = poisson_batches(list(range(100)), 0.1, random.Random(0))
    sizes = [len(next(batches)) for _ in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.08)
    assert len(set(sizes)) > 5  # variable: not fixed-size batches
    assert min(sizes) >= 0 and math.isfinite(sum(sizes))


def _lora(generator) -> dict:
    return {k: v.clone() for k, v in generator.trainable_state().items()}


def test_dp_record_trains_the_lora_through_the_shared_loop_and_reports_epsilon(
    tiny_settings, toy_root
):
    from fedrag_app.data import resolve_clients
    from fedrag_app.task import build_generator, build_retriever, train_local

    s = tiny_settings.replace(dp="record", dp_epsilon=8.0, local_steps=3, num_server_rounds=2)
    client = resolve_clients([toy_root / "client-a"])[0]
    retriever, generator = build_retriever(s), build_generator(s)
    start = _lora(generator)
    ledger = PrivacyLedger(s.dp_delta)
    first = train_local([client], s, retriever, generator, False, 1, privacy=ledger)
    after = _lora(generator)
    assert any(not torch.equal(start[k], after[k]) for k in start)
    # the noise is planned for the run (2 rounds x 3 steps) at this site's rate (2 of 6 pairs)
    assert first["dp-sample-rate"] == pytest.approx(2 / 6)
    z = noise_multiplier(8.0, 1e-5, 2 / 6, 6)
    assert first["dp-noise-multiplier"] == pytest.approx(z)
    second = train_local([client], s, retriever, generator, False, 2, privacy=ledger)
    assert first["dp-epsilon"] < second["dp-epsilon"] <= 8.0 + 0.01
    # Opacus's hooks are gone: the cached model trains again without DP
    assert not any(m._forward_hooks for m in generator.model.modules())
    plain = train_local([client], s.replace(dp="none"), retriever, generator, False, 1)
    assert "dp-epsilon" not in plain and plain["gen-steps"] == 3
    with pytest.raises(BudgetExceeded):  # the site's budget: refused before any step
        before = _lora(generator)
        train_local([client], s, retriever, generator, False, 1,
                    privacy=PrivacyLedger(1e-5, budget=0.01))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in _lora(generator).items())


def test_a_site_with_a_budget_refuses_a_run_without_record_level_dp():
    from fedrag_app.config import Settings
    from fedrag_app.site import SitePolicy, SiteRefusal, check_training, error_code

    with pytest.raises(SiteRefusal) as info:
        check_training(Settings(dp="none"), SitePolicy(max_epsilon=4.0))
    assert info.value.code == "refused: dp"
    check_training(Settings(dp="record"), SitePolicy(max_epsilon=4.0))
    # a coordinator's larger delta would shrink the epsilon a site compares with its budget
    with pytest.raises(SiteRefusal) as info:
        check_training(Settings(dp="record", dp_delta=1e-3), SitePolicy(max_epsilon=4.0))
    assert info.value.code == "refused: dp-delta"
    check_training(
        Settings(dp="record", dp_delta=1e-3), SitePolicy(max_epsilon=4.0, max_delta=1e-3)
    )
    assert error_code(BudgetExceeded("x")) == "refused: privacy-budget"


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"mode": "both"}, "dp"), ({"proximal_mu": 0.1}, "proximal-mu"),
     ({"dp": "client", "strategy": "krum"}, "dp")],
)  # fmt: skip
def test_dp_settings_that_cannot_hold_are_refused_before_models_load(changes, key):
    from fedrag_app.config import Settings

    with pytest.raises(ValueError, match=f"'{key}'"):
        Settings(**{"dp": "record", **changes})
