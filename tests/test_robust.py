"""Poisoning resistance: non-finite replies never reach the model; robust strategies by config."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, Krum, MultiKrum
from test_federation import _meta, reply

from fedrag_app.config import Settings
from fedrag_app.history import History
from fedrag_app.strategies import Recording, RejectNonFinite, make_strategy


def poisoned(node: int, bad: float, n: int = 1):
    values = np.array([1.0, bad, 1.0], dtype=np.float32)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"gen.w": Array(values)}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
        }
    )
    return Message(content=content, metadata=_meta(node))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("inner", [FedAvg, FedMedian])
def test_a_non_finite_reply_is_dropped_and_the_round_aggregates_the_others(bad, inner):
    history = History()
    strategy = Recording(RejectNonFinite(inner(), history, 0), history, offset=0, down=10)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, 1.0, 1), poisoned(2, bad, 100), reply(3, 3.0, 1)]
    )
    assert np.allclose(arrays["gen.w"].numpy(), 2.0)  # the mean (or median) of 1 and 3
    assert metrics["rejected-replies"] == 1.0
    rejected = [r for r in history.rows if r.get("rejected-non-finite")]
    assert [r["client"] for r in rejected] == ["node-2"]
    assert set(rejected[0]) == {"round", "stage", "client", "rejected-non-finite"}  # no data
    aggregated = [r for r in history.rows if r["client"] == "aggregated"]
    assert aggregated[0]["rejected-replies"] == 1.0


def test_a_round_where_every_reply_is_non_finite_keeps_the_model():
    history = History()
    arrays, metrics = RejectNonFinite(FedAvg(), history, 0).aggregate_train(
        1, [poisoned(1, np.nan), poisoned(2, np.inf)]
    )
    assert arrays is None  # Flower's start() keeps the current global weights
    assert metrics["rejected-replies"] == 2.0


@pytest.mark.parametrize("name", ["bulyan", "krum", "multikrum"])
def test_a_rejected_reply_counts_against_the_assumed_hostile_sites(name):
    """Bulyan with f = 1 needs 7 replies: a NaN site among 7 leaves 6, which Flower's Bulyan
    refuses (the model would never move). The rejected site is one of the f, so the other 6
    are aggregated with f = 0, and the strategy's own f is back to 1 afterwards."""
    s = Settings(strategy=name, num_malicious=1, num_krum_selected=3, min_nodes=7)
    history = History()
    strategy = RejectNonFinite(make_strategy(s), history, 0)
    honest = [reply(i, 1.0 + 0.01 * i, 1) for i in range(1, 7)]
    arrays, metrics = strategy.aggregate_train(1, [*honest, poisoned(7, np.nan)])
    assert arrays is not None and metrics["rejected-replies"] == 1.0
    assert np.all(np.abs(arrays["gen.w"].numpy() - 1.035) < 0.04)
    assert strategy.inner.num_malicious_nodes == 1
    if name == "bulyan":  # what Flower's Bulyan does with the 6 at f = 1
        assert make_strategy(s).aggregate_train(1, honest)[0] is None
    # with no reply rejected, f is untouched: Bulyan still refuses 6 replies
    arrays, _ = strategy.aggregate_train(2, honest)
    assert (arrays is None) == (name == "bulyan")


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fedmedian", FedMedian), ("krum", Krum), ("multikrum", MultiKrum), ("bulyan", Bulyan)],
)
def test_robust_strategies_are_flowers_own_chosen_by_config(name, cls):
    s = Settings(strategy=name, num_malicious=1, num_krum_selected=3, min_nodes=6)
    strategy = make_strategy(s)
    assert type(strategy) is cls
    if name in ("krum", "multikrum", "bulyan"):
        assert strategy.num_malicious_nodes == 1
    if name == "multikrum":
        assert strategy.num_nodes_to_select == 3


def test_krum_discards_a_sign_flipped_scaled_update():
    honest = [reply(i, 1.0 + 0.01 * i, 1) for i in range(1, 6)]
    hostile = reply(6, -50.0, 1)
    arrays, _ = make_strategy(Settings(strategy="krum", num_malicious=1)).aggregate_train(
        1, [*honest, hostile]
    )
    assert np.all(arrays["gen.w"].numpy() > 0.9)
    arrays, _ = FedAvg().aggregate_train(1, [*honest, hostile])
    assert np.all(arrays["gen.w"].numpy() < -5)  # the plain mean is dragged away


# ---- client-level DP: Flower's own wrapper and accountant ---------------------------------
class _Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _update_reply(node: int, values: np.ndarray) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"gen.w": Array(values.astype(np.float32))}),
            "metrics": MetricRecord({"num-examples": 10 * node, "dp-weight": 1.0}),
        }
    )
    return Message(content=content, metadata=_meta(node))


def test_client_level_dp_clips_each_site_adds_the_noise_and_accounts_epsilon():
    from conftest import inside_a_run
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    from fedrag_app.strategies import ClientLevelDp

    s = Settings(dp="client", dp_clip_norm=1.0, dp_noise_multiplier=0.8, min_nodes=2,
                 num_server_rounds=3, dp_delta=1e-5)  # fmt: skip
    strategy = make_strategy(s)
    assert isinstance(strategy, ClientLevelDp)
    inside_a_run()
    size = 40_000
    current = ArrayRecord({"gen.w": Array(np.zeros(size, dtype=np.float32))})
    eps = []
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, current, ConfigRecord(), _Grid(4)))
        assert len(messages) == 4
        # every site's update has norm 100: clipped to 1, so the mean is at most 1 in norm
        replies = [_update_reply(n, np.full(size, 100 / np.sqrt(size))) for n in range(1, 5)]
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        delta = arrays["gen.w"].numpy()
        clipped_mean = 1 / np.sqrt(size)
        noise = delta - clipped_mean
        assert noise.std() == pytest.approx(0.8 * 1.0 / 4, rel=0.03)  # z x clip / n
        assert abs(noise.mean()) < 0.01
        eps.append(metrics["dp-client-epsilon"])
    direct = RdpAccountant(
        PrivacyConfig(target_delta=1e-5, population_size=4,
                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                      sampling_method=SamplingMethod.NO_AMPLIFICATION)
    )  # fmt: skip
    direct.compose(GaussianPrivacyEvent(noise_multiplier=0.8, sample_size=4, population_size=4), 2)
    assert 0 < eps[0] < eps[1] == pytest.approx(direct.get_epsilon(1e-5))


def test_the_servers_strategy_chain_runs_client_level_dp_with_scaled_lrs():
    """The wrappers the ServerApp stacks on top of ClientLevelDp read FedAvg's attributes
    (the lr scaling writes into its ``configrecord_key``): this broke every dp=client run."""
    from conftest import inside_a_run

    from fedrag_app.strategies import server_strategy

    s = Settings(
        dp="client",
        dp_noise_multiplier=0.5,
        min_nodes=4,
        num_server_rounds=2,
        client_lr_scale="linear",
    )
    history = History()
    strategy = server_strategy(s, history, start_round=0, down=100)
    inside_a_run()
    current = ArrayRecord({"gen.w": Array(np.zeros(8, dtype=np.float32))})
    messages = list(strategy.configure_train(1, current, ConfigRecord(), _Grid(4)))
    assert len(messages) == 4
    factor = min(4, s.client_lr_scale_max)  # linear in the 4 sampled sites, capped
    assert all(m.content["config"]["gen-lr"] == pytest.approx(s.gen_lr * factor) for m in messages)
    replies = [_update_reply(n, np.full(8, 0.1)) for n in range(1, 5)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and np.isfinite(arrays["gen.w"].numpy()).all()
    agg = next(r for r in history.rows if r["client"] == "aggregated")
    assert agg["dp-client-epsilon"] > 0 and agg["dp-noise-multiplier"] == 0.5
    # evaluate replies carry no dp-weight; their metrics are averaged by num-examples
    assert list(strategy.configure_evaluate(2, current, ConfigRecord(), _Grid(4)))
    evals = [_eval_reply(n, em=10.0 * n, n=n) for n in range(1, 5)]
    metrics = strategy.aggregate_evaluate(2, evals)
    assert metrics["em"] == pytest.approx(sum(10.0 * n * n for n in range(1, 5)) / 10)


def _eval_reply(node: int, em: float, n: int) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, "em": em})})
    return Message(content=content, metadata=_meta(node, "evaluate"))


def test_client_level_dp_derives_its_noise_from_the_target_epsilon():
    from conftest import inside_a_run

    s = Settings(dp="client", dp_epsilon=4.0, num_server_rounds=5, min_nodes=2)
    strategy = make_strategy(s)
    inside_a_run()
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(3))
    z = strategy.wrapped.noise_multiplier
    assert z > 1.0  # a Gaussian release per round: 5 of them within epsilon 4
    from fedrag_app.finetune.privacy import PrivacyLedger

    assert PrivacyLedger(1e-5, entries=[(z, 1.0, 5)]).epsilon() <= 4.0 + 0.01


class _Counting(FedAvg):
    """FedAvg that notes the rounds it was asked to evaluate."""

    def __init__(self):
        super().__init__()
        self.asked: list[int] = []

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.asked.append(server_round)
        return ["message"]

    def aggregate_evaluate(self, server_round, replies):
        return MetricRecord({"round": float(server_round)})


@pytest.mark.parametrize(
    ("every", "offset", "expected"),
    [(1, 0, [1, 2, 3, 4, 5]), (2, 0, [2, 4, 5]), (0, 0, [5]), (2, 2, [4, 5])],
)
def test_evaluation_runs_only_in_the_rounds_due(every, offset, expected):
    from fedrag_app.strategies import EvaluateEvery

    inner = _Counting()
    strategy = EvaluateEvery(inner, every, last=5, offset=offset)
    sent = {}
    for r in range(1, 6 - offset):
        sent[r + offset] = list(strategy.configure_evaluate(r, ArrayRecord(), ConfigRecord(), None))
        assert (strategy.aggregate_evaluate(r, []) is None) == (not sent[r + offset])
    assert [r + offset for r in inner.asked] == expected
    assert [r for r, m in sent.items() if m] == expected
