"""Federation plumbing without processes: weights on the wire, aggregation, replies, resume."""

import numpy as np
import pytest
import torch
from conftest import inside_a_run
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.metadata import Metadata
from flwr.serverapp.strategy import FedAvg

from fedrag_app.config import STRATEGIES, Settings
from fedrag_app.history import History
from fedrag_app.run_folder import RunFolder
from fedrag_app.strategies import (
    ClientLrScaling,
    Recording,
    factor_averaging_error,
    make_strategy,
    momentum_warning,
    server_strategy,
)
from fedrag_app.weights import nbytes, pack, unpack


def _meta(node: int, kind: str = "train") -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0, message_type=kind)  # fmt: skip


def reply(node: int, value: float, n: int) -> Message:
    arrays = ArrayRecord({"gen.w": Array(np.full(3, value, dtype=np.float32))})
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train-loss": value})}
    )
    return Message(content=content, metadata=_meta(node))


def error_reply(node: int) -> Message:
    return Message(Error(code=0, reason="DataError: bad line"), metadata=_meta(node))


def _node(s) -> dict:
    """A simulated site's node config: partition 0, its store where the test keeps stores."""
    return {"partition-id": 0, "num-partitions": 2, "store-path": s.store_dir}


def _base(retriever, generator) -> dict:
    from fedrag_app import task

    return {"base-fingerprint": task.base_fingerprint(retriever, generator)}


def test_pack_unpack_round_trip_with_prefixes():
    states = {
        "generator": {"layers.0.q_proj.lora_A.weight": torch.randn(8, 4, dtype=torch.bfloat16)},
        "retriever": {"0.auto_model.encoder.w": torch.randn(3)},
    }
    record = pack(states)
    assert sorted(record) == ["gen.layers.0.q_proj.lora_A.weight", "ret.0.auto_model.encoder.w"]
    back = unpack(record)
    for comp, state in states.items():
        for key, tensor in state.items():
            assert torch.equal(back[comp][key], tensor.float())
    half = pack(states, "float16")
    assert nbytes(half) < nbytes(record)
    w = states["retriever"]["0.auto_model.encoder.w"]
    assert torch.equal(unpack(half)["retriever"]["0.auto_model.encoder.w"], w.half().float())
    with pytest.raises(KeyError, match="no known prefix"):
        unpack(ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}))


def test_fedavg_weights_by_num_examples_and_survives_a_failed_client():
    history = History()
    strategy = Recording(FedAvg(), history, offset=0, down=100)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, 1.0, 1), reply(2, 4.0, 3), error_reply(3)]
    )
    assert np.allclose(arrays["gen.w"].numpy(), (1.0 * 1 + 4.0 * 3) / 4)
    assert metrics["train-loss"] == pytest.approx(13 / 4)
    by_client = {r["client"]: r for r in history.rows}
    assert by_client["node-3"]["error"] == 1.0 and by_client["node-1"]["num-examples"] == 1
    assert by_client["aggregated"]["bytes-down"] == 300


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategies_come_from_flower_and_config(name):
    from fedrag_app.config import Settings

    settings = Settings(
        strategy=name, min_nodes=3, proximal_mu=0.1, eta=0.3, server_learning_rate=2.0,
        server_momentum=0.5,
    )  # fmt: skip
    strategy = make_strategy(settings)
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    assert strategy.min_available_nodes == 3
    if name == "fedavgm":
        assert (strategy.server_learning_rate, strategy.server_momentum) == (2.0, 0.5)
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        assert strategy.eta == 0.3
    if name == "fedprox":
        inside_a_run()
        msg = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid()))[0]
        assert msg.content["config"]["proximal-mu"] == 0.1


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


@pytest.mark.parametrize(
    ("scale", "fraction", "factor"),
    [("linear", 1.0, 3.0), ("linear", 0.67, 2.0), ("sqrt", 1.0, 3**0.5), ("none", 1.0, None)],
)
def test_clients_train_with_the_lr_scaled_by_the_number_sampled(scale, fraction, factor):
    from fedrag_app.config import Settings

    s = Settings(client_lr_scale=scale, fraction_train=fraction, gen_lr=1e-3, ret_lr=2e-5)
    strategy = make_strategy(s)
    inside_a_run()
    strategy = ClientLrScaling(strategy, s)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid())
    assert len(messages) == (3 if fraction == 1.0 else 2)
    for msg in messages:
        config = msg.content["config"]
        if factor is None:
            assert "gen-lr" not in config and "ret-lr" not in config
        else:
            assert config["gen-lr"] == pytest.approx(1e-3 * factor)
            assert config["ret-lr"] == pytest.approx(2e-5 * factor)


_LOOP = {
    f"{m}-{k}"
    for m in ("gen", "ret")
    for k in ("loss", "loss-first", "steps", "tokens", "seconds", "optimizer-steps", "lr")
}
TRAIN_METRICS = _LOOP | {
    "num-examples", "local-steps", "train-loss", "seconds", "bytes-down", "bytes-up", "peak-rss-mb", "partition-id",
    "skipped-examples", "contexts-cut",
}  # fmt: skip
EVAL_METRICS = {
    "em", "f1", "recall_at_k", "mrr", "num-examples", "seconds", "peak-rss-mb", "partition-id",
}  # fmt: skip


def test_client_reply_holds_only_weights_and_numbers(tiny_settings, toy_root):
    from fedrag_app import task
    from fedrag_app.client_app import evaluate, train

    run_config = {**tiny_settings.to_config(), "data-root": str(toy_root), "mode": "both",
                  "data-order": "run"}  # fmt: skip
    context = Context(run_id=7, node_id=1, node_config=_node(tiny_settings),
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    retriever, generator = task.load_models(tiny_settings, cache_key=7)
    arrays = pack(task.trainable_states("both", retriever, generator))
    config = ConfigRecord({"server-round": 1, **_base(retriever, generator)})
    instruction = Message(content=RecordDict({"arrays": arrays, "config": config}),
                          metadata=_meta(0))  # fmt: skip
    out = train(instruction, context)
    assert set(out.content) == {"arrays", "metrics"}
    assert isinstance(out.content["arrays"], ArrayRecord) and isinstance(
        out.content["metrics"], MetricRecord
    )
    assert all(k.startswith(("gen.", "ret.")) for k in out.content["arrays"])
    assert all(isinstance(v, float) for v in out.content["metrics"].values())
    assert out.content["metrics"]["num-examples"] == 6
    # data-order=run: where the site's pass got to stays in its own state, never in the reply
    position = dict(context.state["data-position"])
    assert position["seed"] == tiny_settings.seed and position["ret"] > 0 and position["gen"] > 0
    # every array is a trainable weight of the global model, with the global model's shapes
    assert {k: a.shape for k, a in out.content["arrays"].items()} == {
        k: a.shape for k, a in arrays.items()
    }
    # only these numbers leave a client: no strings, nothing derived from texts beyond counts
    assert set(out.content["metrics"]) <= TRAIN_METRICS, set(out.content["metrics"]) - TRAIN_METRICS
    ev = evaluate(instruction, context)
    assert set(ev.content) == {"metrics"}
    assert {"em", "f1", "recall_at_k", "mrr", "num-examples"} <= set(ev.content["metrics"])
    assert set(ev.content["metrics"]) <= EVAL_METRICS, set(ev.content["metrics"]) - EVAL_METRICS


@pytest.mark.parametrize("keep", [True, False])
def test_a_client_keeps_its_adam_moments_in_its_own_context_state(tiny_settings, toy_root, keep):
    """Round 2 continues round 1's AdamW (step counts add up); after a round the client sat out,
    it starts afresh (those moments belong to an older global model); they never go out."""
    from fedrag_app import task
    from fedrag_app.client_app import OPTIMIZER_STATE, train

    run_config = {**tiny_settings.to_config(), "data-root": str(toy_root), "mode": "generator",
                  "keep-optimizer-state": keep}  # fmt: skip
    context = Context(run_id=9, node_id=1, node_config=_node(tiny_settings),
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    retriever, generator = task.load_models(tiny_settings, cache_key=9)
    arrays = pack(task.trainable_states("generator", retriever, generator))
    steps = []
    for rnd in (1, 2, 4, 5):  # not sampled in round 3 (partial participation)
        config = ConfigRecord({"server-round": rnd, **_base(retriever, generator)})
        out = train(Message(content=RecordDict({"arrays": arrays, "config": config}),
                            metadata=_meta(0)), context)  # fmt: skip
        steps.append(out.content["metrics"]["gen-optimizer-steps"])
        assert set(out.content["arrays"]) == set(arrays)  # weights only, never moments
    n = tiny_settings.local_steps
    if keep:
        saved = context.state[OPTIMIZER_STATE]
        assert steps == [n, 2 * n, n, 2 * n]  # moments of round 2 are not applied in round 4
        assert saved and all(k.startswith("gen.") for k in saved)
        assert {k.rsplit(".", 1)[1] for k in saved} == {"step", "exp_avg", "exp_avg_sq"}
    else:
        assert steps == [n] * 4 and OPTIMIZER_STATE not in context.state


def test_a_resumed_run_trains_with_the_run_round_not_flowers_restarted_count(
    tiny_settings, toy_root, monkeypatch
):
    """After resuming from round 2, Flower's round 1 is the run's round 3 (seed and lr schedule)."""
    from fedrag_app import client_app, task

    seen = []

    def fake_train(clients, s, retriever, generator, progress, server_round, *_, **__):
        seen.append((s.seed, server_round))
        return {"num-examples": 1.0}

    monkeypatch.setattr(task, "train_local", fake_train)
    run_config = {**tiny_settings.to_config(), "data-root": str(toy_root), "mode": "generator"}
    context = Context(run_id=8, node_id=1, node_config=_node(tiny_settings),
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    retriever, generator = task.load_models(tiny_settings, cache_key=8)
    arrays = pack(task.trainable_states("generator", retriever, generator))
    config = ConfigRecord({"server-round": 1, "round-offset": 2, **_base(retriever, generator)})
    client_app.train(Message(content=RecordDict({"arrays": arrays, "config": config}),
                             metadata=_meta(0)), context)  # fmt: skip
    assert seen == [(tiny_settings.seed + 3, 3)]


def test_reciprocal_rank_fusion_rewards_agreement_across_clients():
    from fedrag_app.federated_query import reciprocal_rank_fusion

    # "b" is never first but every client ranks it high: 1/62 + 1/61 + 1/62 beats 1/61
    assert reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"], ["e", "b"]], k=3) == ["b", "a", "e"]


def test_run_folder_checkpoint_and_resume(tmp_path):
    run = RunFolder.create(str(tmp_path))
    run.history.add(1, "evaluate", "aggregated", {"em": 10.0})
    arrays = ArrayRecord({"gen.w": Array(np.arange(3, dtype=np.float32))})
    run.save_checkpoint(1, arrays, lambda folder: (folder / "adapter").mkdir())
    run.history.add(2, "evaluate", "aggregated", {"em": 20.0})  # a round that never checkpointed
    resumed = RunFolder.create(str(tmp_path), resume="last")
    assert resumed.path == run.path and resumed.start_round == 1
    assert np.array_equal(resumed.checkpoint_arrays()["gen.w"].numpy(), np.arange(3))
    assert [r["round"] for r in resumed.history.rows] == [1]
    assert (run.path / "checkpoint" / "adapter").is_dir() and (run.path / "history.png").exists()
    with pytest.raises(FileNotFoundError, match="no run with a checkpoint"):
        RunFolder.create(str(tmp_path / "empty"), resume="last")


def _lora_products(generator) -> dict[str, torch.Tensor]:
    """Each adapted layer's B x A (what the LoRA adds to its weight), keyed by layer."""
    params = dict(generator.model.named_parameters())
    return {
        name.replace(".lora_A.default.weight", ""): params[name.replace("lora_A", "lora_B")] @ p
        for name, p in params.items()
        if "lora_A" in name
    }


def test_ffa_lora_makes_fedavg_of_the_factors_exact(tiny_settings, toy_root):
    """lora-aggregation=ffa: A is frozen and equal at every party, only B trains and travels,
    so FedAvg of B gives exactly the mean of the sites' B x A; averaging both factors does not."""
    from fedrag_app.data import resolve_clients
    from fedrag_app.task import build_generator, build_retriever, train_local

    clients = resolve_clients([toy_root / "client-a", toy_root / "client-b"])
    for aggregation in ("ffa", "fedavg"):
        s = tiny_settings.replace(lora_aggregation=aggregation, gen_lr=5e-2, local_steps=3)
        sites = []
        for seed, client in enumerate(clients):
            torch.manual_seed(100 + seed)  # different RNG states, as on different machines
            retriever, generator = build_retriever(s), build_generator(s)
            a_before = {
                k: p.clone() for k, p in generator.model.named_parameters() if "lora_A" in k
            }
            train_local([client], s.replace(seed=seed), retriever, generator, progress=False)
            sites.append((generator, a_before, retriever))
        (g1, a1, r1), (g2, a2, r2) = sites
        sent = g1.trainable_state()
        if aggregation == "ffa":
            assert sent and all("lora_B" in k for k in sent)  # A never travels
            assert all(torch.equal(a1[k], a2[k]) for k in a1)  # the same A at every party
            assert all(torch.equal(p, a1[k]) for k, p in g1.model.named_parameters() if k in a1)
            assert g1.base_fingerprint == g2.base_fingerprint
            assert r1.base_fingerprint == r2.base_fingerprint
            assert all("lora_B" in k for k in r1.trainable_state())
        mean_of_products = {
            k: (p1 + p2) / 2
            for (k, p1), p2 in zip(
                _lora_products(g1).items(), _lora_products(g2).values(), strict=True
            )
        }
        params1, params2 = dict(g1.model.named_parameters()), dict(g2.model.named_parameters())
        errors = []
        for layer, target in mean_of_products.items():
            a = (
                params1[f"{layer}.lora_A.default.weight"]
                + params2[f"{layer}.lora_A.default.weight"]
            ) / 2
            b = (
                params1[f"{layer}.lora_B.default.weight"]
                + params2[f"{layer}.lora_B.default.weight"]
            ) / 2
            errors.append(float((b @ a - target).abs().max() / target.abs().max().clamp(min=1e-12)))
        if aggregation == "ffa":
            assert max(errors) < 1e-6, errors
        else:  # plain FedAvg of both factors: mean(B) mean(A) != mean(B A)
            assert max(errors) > 1e-2, errors


def test_alternating_factors_make_fedavg_exact_and_train_both(tiny_settings, toy_root):
    """lora-aggregation=alternate, mode=both: round 1 trains only B, round 2 only A (of the
    generator and the query encoder), every site from the same global weights, so the mean of
    the factors multiplies out to the mean of the sites' B x A in both rounds, and both factors
    move over the two rounds; a centralized call (round 0) trains both at once."""
    from fedrag_app.data import resolve_clients
    from fedrag_app.rag.lora import trained_factor
    from fedrag_app.task import build_generator, build_retriever, train_local

    assert [trained_factor("alternate", r) for r in (0, 1, 2, 3)] == [
        None, "lora_B", "lora_A", "lora_B"
    ]  # fmt: skip
    assert trained_factor("fedavg", 1) is None and trained_factor("ffa", 2) is None
    s = tiny_settings.replace(lora_aggregation="alternate", mode="both", gen_lr=5e-2, ret_lr=5e-2)
    clients = resolve_clients([toy_root / "client-a", toy_root / "client-b"])
    torch.manual_seed(0)
    global_gen, global_ret = (
        build_generator(s).trainable_state(),
        build_retriever(s).trainable_state(),
    )
    start = dict(global_gen)
    for server_round, moved, kept in ((1, "lora_B", "lora_A"), (2, "lora_A", "lora_B")):
        sites = []
        for seed, client in enumerate(clients):
            torch.manual_seed(100 + seed)
            retriever, generator = build_retriever(s), build_generator(s)
            generator.load_trainable_state(global_gen)
            retriever.load_trainable_state(global_ret)
            train_local([client], s.replace(seed=seed), retriever, generator, False, server_round)
            gen, ret = generator.trainable_state(), retriever.trainable_state()
            for state, before in ((gen, global_gen), (ret, global_ret)):
                assert all(torch.equal(v, before[k]) for k, v in state.items() if kept in k)
                assert any(not torch.equal(v, before[k]) for k, v in state.items() if moved in k)
            assert all(p.requires_grad for p in generator.trainable_parameters().values())
            sites.append(generator)
        products = [_lora_products(g) for g in sites]
        states = [g.trainable_state() for g in sites]
        mean = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
        for layer, p1 in products[0].items():
            target = (p1 + products[1][layer]) / 2
            b = mean[f"{layer}.lora_B.default.weight"]
            a = mean[f"{layer}.lora_A.default.weight"]
            err = float((b @ a - target).abs().max() / target.abs().max().clamp(min=1e-12))
            assert err < 1e-6, (server_round, layer, err)
        global_gen = mean
        global_ret = retriever.trainable_state()  # one site's: the exactness check is the gen's
    assert all(not torch.equal(global_gen[k], start[k]) for k in start)  # A and B both moved


@pytest.mark.parametrize(
    "overrides, warned",
    [
        ({"strategy": "fedavgm", "server_momentum": 0.5, "keep_optimizer_state": True}, True),
        ({"strategy": "fedavgm", "server_momentum": 0.5, "keep_optimizer_state": False}, False),
        ({"strategy": "fedavgm", "server_momentum": 0.0}, False),
        ({"strategy": "fedadam", "keep_optimizer_state": True}, True),
        ({"strategy": "fedadam"}, True),  # kept moments are the default
        ({"strategy": "fedavg"}, False),
        ({"strategy": "fedadam", "client_optimizer": "sgd"}, False),  # no client moments
    ],
)
def test_server_momentum_over_kept_client_moments_is_warned_about(overrides, warned):
    s = Settings().replace(**overrides)
    message = momentum_warning(s)
    assert (message is not None) == warned
    if warned:
        assert "keep-optimizer-state=false" in message


def _lora_reply(node: int, a: np.ndarray, b: np.ndarray, n: int) -> Message:
    layer = "gen.layers.0.q_proj"
    arrays = ArrayRecord(
        {
            f"{layer}.lora_A.default.weight": Array(a.astype(np.float32)),
            f"{layer}.lora_B.default.weight": Array(b.astype(np.float32)),
        }
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, metadata=_meta(node))


def test_the_lora_averaging_error_is_measured_against_the_exact_mean_update():
    """mean(B) mean(A) against mean(B A), relative to the round's exact update, weighted by
    num-examples as FedAvg is; 0 when every site has the same A (FFA-LoRA's case)."""
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    b1, b2 = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    key = "gen.l.lora_A.default.weight"
    site = lambda a, b: {key: a, key.replace("lora_A", "lora_B"): b}  # noqa: E731
    sent = site(np.zeros((2, 5)), np.zeros((4, 2)))  # B = 0: the update is the product itself
    w1, w2 = 1 / 4, 3 / 4
    exact = w1 * b1 @ a1 + w2 * b2 @ a2
    apart = (w1 * b1 + w2 * b2) @ (w1 * a1 + w2 * a2)
    want = np.linalg.norm(apart - exact) / np.linalg.norm(exact)
    got = factor_averaging_error([site(a1, b1), site(a2, b2)], [1, 3], sent)
    assert got == {"lora-averaging-error-gen": pytest.approx(want)}
    assert want > 0.1  # independent factors: far from exact
    same_a = factor_averaging_error([site(a1, b1), site(a1, b2)], [1, 3], sent)
    assert same_a["lora-averaging-error-gen"] < 1e-12
    ag, bg = rng.normal(size=(2, 5)), rng.normal(size=(4, 2))  # a later round: B A != 0
    later = np.linalg.norm(apart - exact) / np.linalg.norm(exact - bg @ ag)
    got = factor_averaging_error([site(a1, b1), site(a2, b2)], [1, 3], site(ag, bg))
    assert got["lora-averaging-error-gen"] == pytest.approx(later)


@pytest.mark.parametrize(("strategy", "measured"), [("fedavg", True), ("fedmedian", False)])
def test_the_server_records_the_lora_averaging_error_each_round(strategy, measured):
    inside_a_run()
    s = Settings(strategy=strategy, min_nodes=2)
    history = History()
    chain = server_strategy(s, history, start_round=0, down=100)
    zero = _lora_reply(0, np.zeros((2, 5)), np.zeros((4, 2)), 1).content["arrays"]
    list(chain.configure_train(1, zero, ConfigRecord(), _Grid()))
    rng = np.random.default_rng(1)
    replies = [_lora_reply(n, rng.normal(size=(2, 5)), rng.normal(size=(4, 2)), 10) for n in (1, 2)]
    chain.aggregate_train(1, replies)
    agg = next(r for r in history.rows if r["client"] == "aggregated")
    assert ("lora-averaging-error-gen" in agg) == measured
    if measured:
        assert agg["lora-averaging-error-gen"] > 0.1


def test_server_lr_follows_the_centralized_schedule_and_fedadam_steps_with_it():
    """Round r's server lr is transformers' warmup+decay at step r-1; FedAdam's step uses it."""
    from transformers import get_linear_schedule_with_warmup

    from fedrag_app.strategies import ServerLrSchedule

    s = Settings(strategy="fedadam", eta=0.1, num_server_rounds=10, warmup_ratio=0.2)
    wrapped = ServerLrSchedule(make_strategy(s), s)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 2, 10)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [wrapped.factor(r) for r in range(1, 11)] == pytest.approx(expected)
    assert wrapped.factor(1) == 0.0 and wrapped.factor(3) == 1.0 and wrapped.factor(10) > 0
    resumed = ServerLrSchedule(make_strategy(s), s, start_round=4)
    assert resumed.factor(1) == pytest.approx(expected[4])

    inside_a_run()
    start = ArrayRecord({"gen.w": Array(np.zeros(3, dtype=np.float32))})
    list(wrapped.configure_train(2, start, ConfigRecord(), _Grid()))
    arrays, _ = wrapped.aggregate_train(2, [reply(1, 1.0, 1), reply(2, 1.0, 1)])
    assert wrapped.inner.eta == pytest.approx(0.1 * expected[1])
    # Flower's FedAdam: m = 0.1 d, v = 0.01 d^2, step eta_r sqrt(1-b2^3)/(1-b1^3) m/sqrt(v)
    step = 0.1 * expected[1] * np.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    assert arrays["gen.w"].numpy() == pytest.approx(np.full(3, step), rel=1e-4)
    with pytest.raises(ValueError, match="server-lr-schedule"):
        ServerLrSchedule(make_strategy(s.replace(strategy="fedavg")), s)
    with pytest.raises(ValueError, match="server-momentum > 0"):
        ServerLrSchedule(make_strategy(s.replace(strategy="fedavgm")), s)


def test_fednova_averages_per_step_updates_times_the_mean_steps():
    """A site of 3 examples trained 1 step (update 1), one of 1 example 3 steps (update 6, 2 a
    step): FedAvg gives 2.25, pulled to the busy site; FedNova tau_eff (1.5) x the weighted mean
    per-step update (1.25) = 1.875; with equal steps it is FedAvg exactly."""
    from fedrag_app.strategies import FedNova

    def site(node: int, value: float, n: int, steps: int) -> Message:
        msg = reply(node, value, n)
        msg.content["metrics"]["local-steps"] = float(steps)
        return msg

    inside_a_run()
    sent = ArrayRecord({"gen.w": Array(np.zeros(3, dtype=np.float32))})
    nova = FedNova(FedAvg())
    list(nova.configure_train(1, sent, ConfigRecord(), _Grid()))
    arrays, metrics = nova.aggregate_train(1, [site(1, 1.0, 3, 1), site(2, 6.0, 1, 3)])
    assert arrays["gen.w"].numpy() == pytest.approx(np.full(3, 1.875))
    assert metrics["fednova-tau-eff"] == pytest.approx(1.5)
    plain, _ = FedAvg().aggregate_train(1, [site(1, 1.0, 3, 1), site(2, 6.0, 1, 3)])
    assert plain["gen.w"].numpy() == pytest.approx(np.full(3, 2.25))
    same, _ = nova.aggregate_train(1, [site(1, 1.0, 3, 2), site(2, 6.0, 1, 2)])
    assert same["gen.w"].numpy() == pytest.approx(np.full(3, 2.25))
    strategy = server_strategy(Settings(fednova=True), History(), 0, 0)
    wrappers = []
    while hasattr(strategy, "inner"):
        wrappers.append(type(strategy).__name__)
        strategy = strategy.inner
    assert "FedNova" in wrappers


def test_steps_by_data_divides_the_rounds_steps_by_the_pairs_sites_reported():
    """Round 1, nothing heard yet: equal steps. Then 3 x 5 = 15 steps by 1 : 1 : 2 pairs."""
    from fedrag_app.strategies import StepsByData

    s = Settings(local_steps=5, local_steps_split="data")
    inside_a_run()
    strategy = StepsByData(make_strategy(s), s)
    first = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid())
    assert all("local-steps" not in m.content["config"] for m in first)
    strategy.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 1.0, 10), reply(3, 1.0, 20)])
    second = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), _Grid())
    steps = {m.metadata.dst_node_id: m.content["config"]["local-steps"] for m in second}
    assert steps == {1: 4, 2: 4, 3: 8}
    assert all(m.content["config"]["server-round"] == 2 for m in second)
    with pytest.raises(ValueError, match="'local-steps-split' = 'data'"):
        Settings(local_steps_split="data", local_epochs=0.1)
