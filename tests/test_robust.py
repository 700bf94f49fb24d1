"""Poisoning resistance: non-finite replies never reach the model; robust strategies by config."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
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
