"""Flower's own strategies, chosen and parameterised by run config."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedrag_app.config import AVERAGING, Settings
from fedrag_app.finetune.privacy import DP_WEIGHT, noise_multiplier
from fedrag_app.history import History
from fedrag_app.weights import nbytes


def _common(s: Settings) -> dict:
    return dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_nodes,
        min_evaluate_nodes=s.min_nodes if s.fraction_evaluate > 0 else 0,
        min_available_nodes=s.min_nodes,
    )


def server_strategy(s: Settings, history: History, start_round: int, down: int) -> Strategy:
    """The strategy the ServerApp runs: Flower's own (``make_strategy``), wrapped as its
    ``DifferentialPrivacy*`` classes are: lrs scaled per round, NaN/Inf replies dropped, float16
    updates decoded onto the float32 global model, every reply recorded, and evaluation only in
    the rounds due (``evaluate-every``). ``down`` is the bytes sent to each client per round.
    """
    inner = make_strategy(s)
    if s.server_lr_schedule == "run":
        inner = ServerLrSchedule(inner, s, start_round)
    scaled = ClientLrScaling(inner, s)
    if s.local_steps_split == "data":
        scaled = StepsByData(scaled, s)
    if s.dp != "client" and s.strategy in AVERAGING:
        scaled = LoraAveragingError(scaled)
    if s.fednova:
        scaled = FedNova(scaled)
    checked = Float32Global(RejectNonFinite(scaled, history, start_round))
    recorded = Recording(checked, history, start_round, down)
    return EvaluateEvery(recorded, s.evaluate_every, s.num_server_rounds, start_round)


def momentum_warning(s: Settings) -> str | None:
    """Server momentum on top of clients that keep their AdamW moments collapsed on the demo
    (4 sites, seed 0: FedAvgM 22.5-43.3 EM, FedAdam 23.3, against 53.8 for FedAvgM and 51.7 for
    FedAdam with fresh AdamW moments, 50.8 for FedAvg; README, *More sites*): each client's
    first moment already carries the previous rounds' direction, and the server adds it again.
    A warning, not a refusal: one data set, one seed."""
    momentum = s.strategy in ("fedadam", "fedyogi") or (
        s.strategy == "fedavgm" and s.server_momentum > 0
    )
    if not (momentum and s.keep_optimizer_state and s.client_optimizer == "adamw"):
        return None
    return (
        f"strategy = {s.strategy!r} applies server momentum while clients keep their AdamW "
        "moments (keep-optimizer-state = true): FedAvgM and FedAdam collapsed so on the demo "
        "(README, 'More sites'); consider keep-optimizer-state=false"
    )


def make_strategy(s: Settings) -> Strategy:
    if s.dp == "client":  # every site's update clipped, Gaussian noise on the mean, accounted
        return ClientLevelDp(FedAvg(**_common(s), weighted_by_key=DP_WEIGHT), s)
    common = _common(s)
    if s.strategy == "fedavg":
        return FedAvg(**common)
    if s.strategy == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=s.server_learning_rate,
            server_momentum=s.server_momentum,
        )
    if s.strategy == "fedprox":
        # FedProx sends proximal-mu to clients; task.train_local adds the proximal term.
        return FedProx(**common, proximal_mu=s.proximal_mu)
    if s.strategy == "fedadam":
        return FedAdam(**common, eta=s.eta, tau=s.tau, beta_2=s.server_beta_2)
    if s.strategy == "fedyogi":
        return FedYogi(**common, eta=s.eta, tau=s.tau, beta_2=s.server_beta_2)
    if s.strategy == "fedadagrad":
        return FedAdagrad(**common, eta=s.eta, tau=s.tau)
    if s.strategy == "fedmedian":
        return FedMedian(**common)
    if s.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=s.beta)
    if s.strategy == "krum":
        return Krum(**common, num_malicious_nodes=s.num_malicious)
    if s.strategy == "multikrum":
        return MultiKrum(
            **common,
            num_malicious_nodes=s.num_malicious,
            num_nodes_to_select=s.num_krum_selected,
        )
    if s.strategy == "bulyan":  # needs at least 4 x num-malicious + 3 replies
        return Bulyan(**common, num_malicious_nodes=s.num_malicious)
    raise ValueError(f"config key 'strategy' = {s.strategy!r} is not supported")


class StrategyWrapper(Strategy):
    """Delegates every step to ``inner``; a subclass changes one step, as Flower's own
    ``DifferentialPrivacy*`` wrappers do. Attributes (``configrecord_key``, ...) are the inner's.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class KeepsSent(StrategyWrapper):
    """A wrapper that forms updates: it keeps the round's sent weights (those ``keep`` admits)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.sent: dict[str, np.ndarray] = {}

    def keep(self, key: str) -> bool:
        return True

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = {k: a.numpy().astype(np.float32) for k, a in arrays.items() if self.keep(k)}
        return self.inner.configure_train(server_round, arrays, config, grid)


def with_arrays(reply: Message, arrays: ArrayRecord) -> Message:
    """The reply with other arrays: a new message, the received one stays as it came."""
    return Message(content=RecordDict({**reply.content, "arrays": arrays}), metadata=reply.metadata)


class ClientLevelDp(StrategyWrapper):
    """Client-level DP with Flower's own ``DifferentialPrivacyServerSideFixedClipping`` around
    FedAvg and Flower's RDP accountant: each round clips every site's update to
    ``dp-clip-norm`` and adds Gaussian noise (``dp-noise-multiplier`` x clip / n) to the mean.

    Flower's wrapper needs the number of sites sampled per round, known only once the grid
    is: it is built at the first round, with Flower's own rule (max(fraction x available,
    min-nodes)). The accountant composes one un-amplified Gaussian release per round (Flower
    1.41 accounts no sampling amplification), so epsilon is an upper bound; a round in which a
    sampled site fails is not released (Flower's accounted mode). ``dp-client-epsilon`` in the
    round's aggregate is the epsilon spent so far, at ``dp-delta``.
    """

    def __init__(self, inner: FedAvg, s: Settings) -> None:
        super().__init__(inner)
        self.settings = s
        self.wrapped: DifferentialPrivacyServerSideFixedClipping | None = None
        # evaluate replies carry no dp-weight: their metrics are averaged by num-examples
        self.evaluator = FedAvg(**_common(s))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.evaluator.aggregate_evaluate(server_round, replies)

    def _build(self, grid: Grid) -> DifferentialPrivacyServerSideFixedClipping:
        s = self.settings
        nodes = len(list(grid.get_node_ids()))
        sampled = max(int(nodes * s.fraction_train), s.min_nodes)
        z = noise_multiplier(
            s.dp_epsilon, s.dp_delta, 1.0, s.num_server_rounds, s.dp_noise_multiplier
        )
        config = PrivacyConfig(
            target_delta=s.dp_delta,
            population_size=max(nodes, sampled),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
        return DifferentialPrivacyServerSideFixedClipping(
            self.inner, z, s.dp_clip_norm, sampled, accountant=RdpAccountant(config)
        )

    # ``inner`` stays the FedAvg, so outer wrappers read its attributes (``configrecord_key``);
    # the train steps go through Flower's DP wrapper around it
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.wrapped is None:
            self.wrapped = self._build(grid)
        return self.wrapped.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        step = self.wrapped or self.inner  # no round configured yet: nothing to release
        arrays, metrics = step.aggregate_train(server_round, replies)
        extra = {}
        if self.wrapped is not None:
            spent = self.wrapped.privacy_spent()
            extra = {
                "dp-client-epsilon": float(spent.epsilon) if spent else 0.0,
                "dp-noise-multiplier": float(self.wrapped.noise_multiplier),
            }
        return arrays, MetricRecord({**dict(metrics or {}), **extra})


class ClientLrScaling(StrategyWrapper):
    """Send each round's clients ``gen-lr``/``ret-lr`` times n (or sqrt n), n = clients sampled.

    Averaging n clients' updates is like one n-times larger batch: the pooled run on the same
    data takes n times as many optimizer steps, so at equal lr FedAvg falls behind it. Scaling
    the lr with the batch (the linear-scaling rule) raised FedAvg's mean EM over 3 seeds from
    44.7 to 49.0 on the demo's 2 sites; sqrt (Adam's usual rule) did no better at 2 and 4 sites
    on two data sets (README, 'More sites'). The factor is capped at ``client-lr-scale-max``
    (default 4; beyond it an Adam lr of 4 x 3e-3 is already large). n counts the clients
    SAMPLED this round: a client that then fails still counted. Centralized training never
    passes through this.
    """

    def __init__(self, inner: Strategy, s: Settings) -> None:
        super().__init__(inner)
        self.settings = s

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        s = self.settings
        if s.client_lr_scale == "none":
            return messages
        n = len(messages)  # sampled, not replied: failures are known only after the round
        factor = float(n) if s.client_lr_scale == "linear" else math.sqrt(n)
        factor = min(factor, s.client_lr_scale_max)  # 20 sites must not train at 20x the lr
        for msg in messages:  # Flower's strategies share one RecordDict between messages
            msg.content[self.inner.configrecord_key]["gen-lr"] = s.gen_lr * factor
            msg.content[self.inner.configrecord_key]["ret-lr"] = s.ret_lr * factor
        return messages


class StepsByData(StrategyWrapper):
    """Divide a round's n x ``local-steps`` steps among its n sampled sites in proportion to
    the QA pairs each reported (``num-examples`` of its last reply), at least one each.

    With equal steps a site holding half the data draws a quarter of the examples at 4 sites,
    while FedAvg weights its update by half. ``local-epochs`` fixes that too, but needs an E
    per data size; this keeps the budget of ``local-steps`` whatever the data. A site not yet
    heard from (round 1, a newcomer) makes the round equal for all.
    """

    def __init__(self, inner: Strategy, s: Settings) -> None:
        super().__init__(inner)
        self.steps = s.local_steps
        self.pairs: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        sizes = [self.pairs.get(m.metadata.dst_node_id) for m in messages]
        if not messages or any(n is None for n in sizes) or sum(sizes) <= 0:
            return messages
        key, budget, total = self.inner.configrecord_key, self.steps * len(messages), sum(sizes)
        out = []
        for msg, n in zip(messages, sizes, strict=True):
            steps = max(1, round(budget * n / total))
            config = ConfigRecord({**msg.content[key], "local-steps": steps})
            out.append(  # a RecordDict of its own: Flower's messages share one
                Message(
                    content=RecordDict({**msg.content, key: config}),
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                )
            )
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content() and "num-examples" in msg.content["metrics"]:
                self.pairs[msg.metadata.src_node_id] = float(msg.content["metrics"]["num-examples"])
        return self.inner.aggregate_train(server_round, replies)


class ServerLrSchedule(StrategyWrapper):
    """The server's learning rate (``eta`` of FedAdam, FedYogi and FedAdagrad,
    ``server-learning-rate`` of FedAvgM) follows one linear warmup (``warmup-ratio`` of the
    rounds) and linear decay to zero over the run, the schedule a centralized run gives its
    steps. Flower keeps it constant; an adaptive server optimizer also cancels the sites'
    own schedule (it normalises the pseudo-gradient's scale), so without this nothing decays.
    """

    def __init__(self, inner: Strategy, s: Settings, start_round: int = 0) -> None:
        super().__init__(inner)
        self.name = "eta" if hasattr(inner, "eta") else "server_learning_rate"
        if not hasattr(inner, self.name):
            raise ValueError(
                f"config key 'server-lr-schedule' = 'run' needs a strategy with a server "
                f"learning rate (fedadam, fedyogi, fedadagrad, fedavgm), got {s.strategy!r}"
            )
        if not getattr(inner, "server_opt", True):  # FedAvgM skips its update at lr 1, momentum 0
            raise ValueError(
                "config key 'server-lr-schedule' = 'run' with strategy = 'fedavgm' needs "
                "server-momentum > 0 or server-learning-rate != 1"
            )
        self.base = float(getattr(inner, self.name))
        self.total = s.num_server_rounds
        self.warmup = int(s.warmup_ratio * s.num_server_rounds)
        self.start_round = start_round

    def factor(self, server_round: int) -> float:
        """transformers' ``get_linear_schedule_with_warmup`` at step ``round - 1`` of the run."""
        step = self.start_round + server_round - 1
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        setattr(self.inner, self.name, self.base * self.factor(server_round))
        return self.inner.aggregate_train(server_round, replies)


class FedNova(KeepsSent):
    """Each site's update divided by the local steps it took, then averaged (FedNova, Wang et
    al., NeurIPS 2020). With ``local-epochs`` a site holding 3x the data takes 3x the steps, and
    FedAvg, which also weights it by its examples, counts its data about n_k^2 times: the
    global model leans to the big site's optimum (objective inconsistency). Here each reply
    becomes sent + tau_eff / tau_k x (its weights - sent), tau_k its ``local-steps``, tau_eff =
    sum_k p_k tau_k with p_k the weights the inner strategy uses, so the inner mean is tau_eff
    times the weighted mean of the sites' per-step updates. Equal steps change nothing.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key = getattr(self.inner, "weighted_by_key", "num-examples")
        trained = [m for m in replies if m.has_content() and "local-steps" in m.content["metrics"]]
        weights = np.array([float(m.content["metrics"][key]) for m in trained])
        steps = np.array([float(m.content["metrics"]["local-steps"]) for m in trained])
        if not trained or weights.sum() <= 0 or (steps <= 0).any():
            return self.inner.aggregate_train(server_round, replies)
        tau_eff = float(weights @ steps / weights.sum())
        scale = {id(m): tau_eff / tau for m, tau in zip(trained, steps, strict=True)}
        out = []
        for msg in replies:
            if id(msg) in scale:
                msg = with_arrays(msg, self._rescaled(msg.content["arrays"], scale[id(msg)]))
            out.append(msg)
        arrays, metrics = self.inner.aggregate_train(server_round, out)
        return arrays, MetricRecord({**dict(metrics or {}), "fednova-tau-eff": tau_eff})

    def _rescaled(self, record: ArrayRecord, factor: float) -> ArrayRecord:
        out = {}
        for k, array in record.items():
            values = array.numpy()
            if k in self.sent:
                values = self.sent[k] + factor * (values - self.sent[k])
            out[k] = Array(np.asarray(values, dtype=np.float32))
        return ArrayRecord(out)


class LoraAveragingError(KeepsSent):
    """Measure, every round, what averaging LoRA factors separately costs: the aggregated
    metric ``lora-averaging-error-gen`` (``-ret`` for the query encoder) is
    ||mean(B_i) mean(A_i) - mean(B_i A_i)|| / ||mean(B_i A_i) - B A||, summed over the adapter's
    layers, the means weighted by ``num-examples`` as FedAvg weighs them, B A the global
    product sent that round. 0 means exact; FFA-LoRA (A never travels) reports nothing, being
    exact by construction. It tells a federation whether exact LoRA aggregation could matter
    before anyone pays for it. Numbers only: the aggregate itself is the inner strategy's.
    """

    def keep(self, key: str) -> bool:
        return ".lora_" in key

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        records = [m.content for m in replies if m.has_content() and "arrays" in m.content]
        if len(records) < 2:
            return arrays, metrics
        sites = [{k: a.numpy() for k, a in c["arrays"].items()} for c in records]
        weights = [float(c["metrics"].get("num-examples", 1.0)) for c in records]
        errors = factor_averaging_error(sites, weights, self.sent)
        if errors:
            metrics = MetricRecord({**dict(metrics or {}), **errors})
        return arrays, metrics


def factor_averaging_error(
    sites: list[dict[str, np.ndarray]], weights: list[float], sent: dict[str, np.ndarray]
) -> dict[str, float]:
    """Relative error of averaging A and B apart, per prefix (``gen``, ``ret``); see
    ``LoraAveragingError``. Layers without both factors at every site are left out.

    Each difference of products is one product of stacked factors, U V, whose squared norm is
    sum((U^T U) * (V V^T)): no out x in matrix is formed, so a 4096-wide model costs
    megabytes, not a dense copy of every adapted weight per site."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    err_sq: dict[str, float] = {}
    upd_sq: dict[str, float] = {}
    for key_a in sites[0]:
        if ".lora_A." not in key_a:
            continue
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if not all(key_a in site and key_b in site for site in sites):
            continue
        a = [site[key_a].astype(np.float64) for site in sites]
        b = [wi * site[key_b].astype(np.float64) for wi, site in zip(w, sites, strict=True)]
        mean_a, mean_b = sum(wi * ai for wi, ai in zip(w, a, strict=True)), sum(b)
        # sum_i w_i B_i A_i - mean(B) mean(A), and sum_i w_i B_i A_i - B A (the global sent)
        err = _product_norm_sq(b + [-mean_b], a + [mean_a])
        ends = ([-sent[key_b].astype(np.float64)], [sent[key_a].astype(np.float64)])
        if key_a not in sent or key_b not in sent:
            ends = ([], [])
        upd = _product_norm_sq(b + ends[0], a + ends[1])
        prefix = key_a.split(".", 1)[0]
        err_sq[prefix] = err_sq.get(prefix, 0.0) + err
        upd_sq[prefix] = upd_sq.get(prefix, 0.0) + upd
    return {
        f"lora-averaging-error-{p}": math.sqrt(err_sq[p] / upd_sq[p]) if upd_sq[p] > 0 else 0.0
        for p in err_sq
    }


def _product_norm_sq(bs: list[np.ndarray], as_: list[np.ndarray]) -> float:
    """||sum_j B_j A_j||_F^2 from the stacked factors [B_1 ... B_k] and [A_1; ...; A_k]."""
    u, v = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
    return max(float(np.sum((u.T @ u) * (v @ v.T))), 0.0)


class Float32Global(KeepsSent):
    """The global model and all server arithmetic stay float32, whatever travels.

    With ``wire-dtype=float16`` a client sends its UPDATE (trained minus received weights) in
    float16, not its weights: an update far smaller than a float16 step of the weight itself
    (4.9e-4 near 0.9) survives, and FedAdam's ``tau`` never meets float16. Here each float16
    reply is decoded to float32 weights (global + update) before the inner strategy sees it.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        decoded = []
        for msg in replies:
            if msg.has_content() and "arrays" in msg.content:
                msg = with_arrays(msg, decode_update(msg.content["arrays"], self.sent))
            decoded.append(msg)
        arrays, metrics = self.inner.aggregate_train(server_round, decoded)
        if arrays is not None:  # FedAdam & co. compute in float64: the global stays float32
            arrays = ArrayRecord(
                {k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()}
            )
        return arrays, metrics


def decode_update(record: ArrayRecord, sent: dict[str, np.ndarray]) -> ArrayRecord:
    """float16 arrays are updates against ``sent``; float32 arrays are weights already."""
    out = {}
    for key, array in record.items():
        values = array.numpy()
        if values.dtype == np.float16:
            values = sent[key] + values.astype(np.float32)
        out[key] = Array(np.asarray(values, dtype=np.float32))
    return ArrayRecord(out)


class RejectNonFinite(StrategyWrapper):
    """Drop every reply whose arrays hold NaN or Inf before the inner strategy sees it.

    One broken or hostile site must not turn the global model into NaN (a mean, a median and
    FedAdam's moments all propagate it). The round goes on with the other replies; each
    rejected node gets a history row (``rejected-non-finite`` = 1, no data) and the round's
    aggregate counts them in ``rejected-replies``. A Byzantine-robust strategy assumes at most
    ``num_malicious_nodes`` hostile replies; each rejected one is among them, so the rest are
    aggregated with that many fewer (Bulyan at exactly 4f+3 sites would otherwise skip every
    round a NaN site answers: one broken site would stall the federation).
    """

    def __init__(self, inner: Strategy, history: History, offset: int) -> None:
        super().__init__(inner)
        self.history, self.offset = history, offset

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, rejected = [], 0
        for msg in replies:
            if msg.has_content() and not all_finite(msg.content["arrays"]):
                rejected += 1
                node = f"node-{msg.metadata.src_node_id}"
                self.history.add(
                    server_round + self.offset, "train", node, {"rejected-non-finite": 1.0}
                )
                continue
            kept.append(msg)
        with fault_budget_spent(self.inner, rejected):
            arrays, metrics = (
                self.inner.aggregate_train(server_round, kept) if kept else (None, None)
            )
        metrics = MetricRecord({**dict(metrics or {}), "rejected-replies": float(rejected)})
        return arrays, metrics


@contextmanager
def fault_budget_spent(strategy: Strategy, rejected: int) -> Iterator[None]:
    """Lower Flower's ``num_malicious_nodes`` (Krum, MultiKrum, Bulyan) by ``rejected`` for
    one aggregation, and restore it after."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.inner
    assumed = getattr(strategy, "num_malicious_nodes", None)
    if not rejected or assumed is None:
        yield
        return
    strategy.num_malicious_nodes = max(0, assumed - rejected)
    try:
        yield
    finally:
        strategy.num_malicious_nodes = assumed


def all_finite(record: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in record.values())


class EvaluateEvery(StrategyWrapper):
    """Federated evaluation only after every ``every``-th round and after the last (0: the last
    only, without the round-0 base): on the demo a round's evaluation costs 2-4x its training,
    and a short benchmark or a long run rarely needs every point of the curve. Rounds count
    from the run's start, so a resumed run keeps the same schedule."""

    def __init__(self, inner: Strategy, every: int, last: int, offset: int) -> None:
        super().__init__(inner)
        self.every, self.last, self.offset = every, last, offset

    def _due(self, server_round: int) -> bool:
        done = server_round + self.offset
        return (done == self.last and done > 0) or (self.every > 0 and done % self.every == 0)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._due(server_round):
            return []
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        if not self._due(server_round):
            return None
        return self.inner.aggregate_evaluate(server_round, replies)


class Recording(StrategyWrapper):
    """Log every reply's metrics per client (node) before the inner strategy aggregates them;
    an error reply is recorded by its fixed code only (site.py)."""

    def __init__(self, inner: Strategy, history: History, offset: int, down: int) -> None:
        super().__init__(inner)
        self.history, self.offset, self.down = history, offset, down

    def _per_client(self, server_round: int, stage: str, replies: list[Message]) -> None:
        for msg in replies:
            node = f"node-{msg.metadata.src_node_id}"
            if msg.has_error():
                code = float(msg.error.code)
                self.history.add(
                    server_round + self.offset, stage, node, {"error": 1.0, "error-code": code}
                )
                continue
            metrics = dict(msg.content["metrics"])
            if "partition-id" in metrics:  # simulation: name the client by its partition
                node = f"partition-{int(metrics['partition-id'])}"
            self.history.add(server_round + self.offset, stage, node, metrics)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._per_client(server_round, "train", replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        agg = {k: v for k, v in dict(metrics or {}).items() if k != "partition-id"}
        agg["bytes-down"] = float(self.down * len(replies))
        agg["bytes-up"] = float(
            sum(nbytes(m.content["arrays"]) for m in replies if m.has_content())
        )
        self.history.add(server_round + self.offset, "train", "aggregated", agg)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._per_client(server_round, "evaluate", replies)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        agg = {k: v for k, v in dict(metrics or {}).items() if k != "partition-id"}
        self.history.add(server_round + self.offset, "evaluate", "aggregated", agg)
        return metrics
