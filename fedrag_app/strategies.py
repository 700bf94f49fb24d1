"""Flower's own strategies, chosen and parameterised by run config."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedrag_app.config import Settings


def make_strategy(s: Settings) -> Strategy:
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_nodes,
        min_evaluate_nodes=s.min_nodes if s.fraction_evaluate > 0 else 0,
        min_available_nodes=s.min_nodes,
    )
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
        return FedAdam(**common, eta=s.eta, tau=s.tau)
    if s.strategy == "fedyogi":
        return FedYogi(**common, eta=s.eta, tau=s.tau)
    if s.strategy == "fedadagrad":
        return FedAdagrad(**common, eta=s.eta, tau=s.tau)
    if s.strategy == "fedmedian":
        return FedMedian(**common)
    if s.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=s.beta)
    if s.strategy == "krum":
        return Krum(**common, num_malicious_nodes=s.num_malicious)
    raise ValueError(f"config key 'strategy' = {s.strategy!r} is not supported")
