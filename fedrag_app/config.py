"""Typed settings shared by the CLI and the Flower app.

The keys are the kebab-case keys of ``[tool.flwr.app.config]`` in pyproject.toml; a test keeps
the two in sync, so ``flwr run --run-config`` and ``fedrag ... -c`` accept the same settings.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# Settings a site decides (site.py): local commands take them, a run config may not.
LOCAL_ONLY = ("store_dir", "store_mode", "qdrant_url", "qdrant_api_key_env")

# Flower strategy classes selectable with the `strategy` key (see strategies.py).
STRATEGIES = (
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
    "fedtrimmedavg", "krum", "multikrum", "bulyan",
)  # fmt: skip
# those whose aggregate starts from the example-weighted mean of the clients' weights
AVERAGING = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class Settings:
    # Data and models
    data_root: str = ""
    # Where a store lives is the site's decision (site.py): these four come from a SuperNode's
    # node config in federated runs, from the CLI's --store-dir / -c locally; never from a run.
    store_dir: str = ""
    store_mode: str = "embedded"
    qdrant_url: str = ""
    qdrant_api_key_env: str = "QDRANT_API_KEY"
    retriever_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    context_model: str = ""
    generator_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    device: str = "cpu"
    dtype: str = "float32"
    chunk_tokens: int = 128
    chunk_overlap: int = 16
    top_k: int = 3
    max_new_tokens: int = 16
    max_context_chars: int = 700
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,v_proj"
    retriever_lora_r: int = 8
    # Fine-tuning
    mode: str = "generator"
    local_steps: int = 5
    local_epochs: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    micro_batch_tokens: int = 384
    gen_lr: float = 3e-3
    ret_lr: float = 1e-3
    warmup_ratio: float = 0.1
    lr_schedule: str = "run"
    client_lr_scale: str = "linear"
    client_lr_scale_max: float = 4.0
    keep_optimizer_state: bool = True
    fednova: bool = False
    data_order: str = "round"
    local_steps_split: str = "equal"
    max_grad_norm: float = 1.0
    max_seq_len: int = 640
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    raft_p: float = 0.0
    raft_distractors: int = 2
    lsr_k: int = 4
    lsr_batch_size: int = 16
    lsr_gamma: float = 0.05
    lsr_tau: float = 1.0
    lsr_target: str = "sum"
    proximal_mu: float = 0.0
    eval_limit: int = 50
    # Federation
    num_server_rounds: int = 6
    strategy: str = "fedavg"
    lora_aggregation: str = "fedavg"
    client_optimizer: str = "adamw"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    evaluate_every: int = 1
    min_nodes: int = 2
    round_timeout: int = 3600
    eta: float = 1e-2
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    tau: float = 1e-9
    server_beta_2: float = 0.99
    server_lr_schedule: str = "constant"
    beta: float = 0.2
    num_malicious: int = 0
    num_krum_selected: int = 1
    # Differential privacy: record-level DP-SGD in finetune/privacy.py, client-level in
    # strategies.py (Flower's own wrapper)
    dp: str = "none"
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 0.0
    wire_dtype: str = "float32"
    output_dir: str = "outputs"
    resume: str = ""
    query_question: str = ""

    def __post_init__(self) -> None:
        choices = {
            "store_mode": ("embedded", "edge", "memory", "server"),
            "device": ("cpu", "cuda", "auto"),
            "dtype": ("float32", "bfloat16", "float16"),
            "mode": ("generator", "retriever", "both"),
            "wire_dtype": ("float32", "float16"),
            "lr_schedule": ("run", "round", "constant"),
            "client_lr_scale": ("linear", "sqrt", "none"),
            "strategy": STRATEGIES,
            "dp": ("none", "record", "client"),
            "lora_aggregation": ("fedavg", "ffa", "alternate"),
            "client_optimizer": ("adamw", "sgd"),
            "server_lr_schedule": ("constant", "run"),
            "data_order": ("round", "run"),
            "local_steps_split": ("equal", "data"),
            "lsr_target": ("sum", "mean"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"config key '{_kebab(name)}' = {getattr(self, name)!r}: "
                    f"expected one of {', '.join(allowed)}"
                )
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("config key 'chunk-overlap' must be smaller than 'chunk-tokens'")
        for name, (low, high, low_open) in RANGES.items():
            value = getattr(self, name)
            if value < low or (low_open and value == low) or (high is not None and value > high):
                span = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
                raise ValueError(
                    f"config key '{_kebab(name)}' = {value!r}: expected a value in {span}"
                )

        if self.server_beta_2 >= 1:
            raise ValueError(
                f"config key 'server-beta-2' = {self.server_beta_2!r}: expected a value in (0, 1)"
            )
        if self.server_lr_schedule == "run" and not (
            self.strategy in ("fedadam", "fedyogi", "fedadagrad")
            or (
                self.strategy == "fedavgm"
                and (self.server_momentum > 0 or self.server_learning_rate != 1)
            )
        ):
            raise ValueError(
                "config key 'server-lr-schedule' = 'run' needs a server learning rate to "
                "schedule: strategy = fedadam | fedyogi | fedadagrad, or fedavgm with "
                f"server-momentum > 0 or server-learning-rate != 1 (got strategy = {self.strategy!r})"
            )
        if self.dp == "record" and self.mode != "generator":
            raise ValueError(
                "config key 'dp' = 'record' trains the generator only (mode = generator): "
                "DP-SGD of the query encoder's LSR loss is not implemented"
            )
        if self.dp == "record" and self.proximal_mu > 0:
            raise ValueError(
                "config key 'proximal-mu' must be 0 with dp = 'record' (DP-SGD clips "
                "per-example gradients; the proximal term has none)"
            )
        if self.dp == "record" and self.gradient_checkpointing:
            raise ValueError(
                "config key 'gradient-checkpointing' must be false with dp = 'record' (Opacus's "
                "per-example gradients would see every recomputed layer twice)"
            )
        if self.dp == "record" and self.lora_aggregation == "alternate":
            raise ValueError(
                "config key 'lora-aggregation' = 'alternate' is not supported with dp = 'record' "
                "(Opacus's per-example gradients are untested with a factor frozen per round)"
            )
        if self.fednova and (self.dp == "client" or self.strategy not in AVERAGING):
            raise ValueError(
                "config key 'fednova' = true rescales updates before they are averaged: it needs "
                "an averaging strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad) "
                f"and dp != 'client' (got strategy = {self.strategy!r}, dp = {self.dp!r})"
            )
        if self.local_steps_split == "data" and (self.local_epochs > 0 or self.dp == "record"):
            raise ValueError(
                "config key 'local-steps-split' = 'data' divides n x local-steps among the sites; "
                "it needs local-epochs = 0 (which sets a site's steps itself) and dp != 'record' "
                "(DP-SGD plans its noise for a fixed number of steps per round)"
            )
        if self.dp == "client" and self.strategy != "fedavg":
            raise ValueError(
                "config key 'dp' = 'client' needs strategy = fedavg (Flower's privacy "
                f"accounting is defined for FedAvg's mean), got strategy = {self.strategy!r}"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """Kebab-case dict, as Flower's run config holds it: the site-owned store keys are not
        part of it (a site refuses a run config that names them)."""
        return {
            _kebab(f.name): getattr(self, f.name) for f in fields(self) if f.name not in LOCAL_ONLY
        }


# (lowest, highest or None, lowest excluded): checked before any model loads
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "chunk_tokens": (1, None, False), "chunk_overlap": (0, None, False),
    "top_k": (1, None, False), "max_new_tokens": (1, None, False),
    "max_context_chars": (1, None, False),
    "lora_r": (1, None, False), "lora_alpha": (0, None, True), "lora_dropout": (0, 1, False),
    "retriever_lora_r": (0, None, False),
    "local_steps": (0, None, False), "local_epochs": (0, None, False), "batch_size": (1, None, False),
    "grad_accum": (1, None, False), "micro_batch_tokens": (0, None, False), "gen_lr": (0, None, True), "ret_lr": (0, None, True),
    "warmup_ratio": (0, 1, False), "client_lr_scale_max": (1, None, False),
    "max_grad_norm": (0, None, True), "max_seq_len": (16, None, False),
    "raft_p": (0, 1, False), "raft_distractors": (0, None, False),
    "lsr_k": (1, None, False), "lsr_batch_size": (1, None, False), "lsr_gamma": (0, None, True), "lsr_tau": (0, None, True),
    "proximal_mu": (0, None, False), "eval_limit": (0, None, False),
    "num_server_rounds": (0, None, False), "fraction_train": (0, 1, True),
    "fraction_evaluate": (0, 1, False), "evaluate_every": (0, None, False),
    "min_nodes": (1, None, False),
    "round_timeout": (0, None, True), "eta": (0, None, True),
    "server_learning_rate": (0, None, True), "server_momentum": (0, 1, False),
    "tau": (0, None, True), "server_beta_2": (0, 1, True), "beta": (0, 0.5, False), "num_malicious": (0, None, False),
    "num_krum_selected": (1, None, False),
    "dp_epsilon": (0, None, True), "dp_delta": (0, 1, True), "dp_clip_norm": (0, None, True),
    "dp_noise_multiplier": (0, None, False),
}  # fmt: skip


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_FIELDS = {_kebab(f.name): f for f in fields(Settings)}


def _coerce(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(
                f"config key '{key}': expected {kind.__name__}, got {value!r}"
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"config key '{key}': expected {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def settings_from(config: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
    """Build Settings from a kebab-case mapping (run config), ignoring Flower's own keys."""
    values: dict[str, Any] = {}
    for key, value in dict(config or {}).items():
        field = _FIELDS.get(key)
        if field is None:
            continue  # Flower adds its own keys (e.g. server-round) to message configs
        kind = {"int": int, "float": float, "bool": bool, "str": str}[str(field.type)]
        values[field.name] = _coerce(key, value, kind)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def parse_overrides(texts: list[str] | None) -> dict[str, Any]:
    """Parse ``-c "key=value key2=value2"`` strings; unknown keys are errors, with the key named."""
    result: dict[str, Any] = {}
    for text in texts or []:
        for item in shlex.split(text):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"config override {item!r}: expected key=value")
            key = key.strip()
            if key not in _FIELDS:
                raise ValueError(
                    f"unknown config key '{key}' (known: {', '.join(sorted(_FIELDS))})"
                )
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            result[key] = value
    return result


def known_keys() -> list[str]:
    return list(_FIELDS)
