"""The trust boundary of a site, whole: what a site decides, and what may leave it.

A site (an institution) and the coordinator are different parties. The coordinator writes the
run config and the ServerApp's messages; a site writes only its SuperNode's ``--node-config``
(and the policy file that names, if any). So every key that decides where a site's data goes or
what leaves it is read from the site's side and from nowhere else:

    flower-supernode ... --node-config "data-path='/srv/a/data' store-path='/srv/a/stores'"
    flower-supernode ... --node-config "site-policy='/srv/a/policy.toml'"

A run config or message config that names one of these keys is refused: the site logs why in
its own log file and replies with an error that carries only a fixed code naming the key.
Errors never carry exception text (file names, document ids or a question would leak), and the
full error goes to the site's log, never to stdout or stderr (which, in simulation, reach the
run's log on the server).

In simulation, one party runs every site on one machine: ``partition-id`` picks a client folder
of the run's ``data-root``, and the policy file named by ``$FEDRAG_SITE_POLICY`` (written by
``fedrag_app.simulation --site ...``) stands in for the node configs; its ``[sites.NAME]`` tables
give one site its own settings.
"""

from __future__ import annotations

import logging
import os
import tomllib
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flwr.app import Error, Message

from fedrag_app.config import Settings, _coerce, settings_from
from fedrag_app.data import ClientData, DataError, resolve_clients

POLICY_ENV = "FEDRAG_SITE_POLICY"


@dataclass(frozen=True)
class SitePolicy:
    """What a site decides for itself. Secure defaults: nothing but weights and numbers leave."""

    data_path: str = ""  # deployment: this site's client folder
    site_id: str = ""  # names this site's store ("" = its data folder's name); unique per server
    store_path: str = ""  # embedded stores ("" = $FEDRAG_STORE_DIR or ~/.cache/fedrag-app/stores)
    store_mode: str = "embedded"  # embedded | edge | memory | server (a qdrant-url alone: server)
    qdrant_url: str = ""  # this site's own Qdrant server
    qdrant_api_key_env: str = "QDRANT_API_KEY"  # environment variable holding its API key
    allow_federated_query: bool = False  # answer query messages with retrieved chunk TEXT
    max_query_k: int = 5  # at most this many chunks per federated query
    allow_full_retriever: bool = False  # send a fully trained query encoder (reveals tokens)
    log_path: str = ""  # this site's private log ("" = <store dir>/<site>.site.log)
    max_epsilon: float = 0.0  # > 0: train only with dp=record, and never past this epsilon
    max_delta: float = 1e-5  # with max-epsilon: the run's dp-delta may not exceed this

    def __post_init__(self) -> None:
        if self.store_mode not in ("embedded", "edge", "memory", "server"):
            raise ValueError(
                f"site policy key 'store-mode' = {self.store_mode!r}: expected embedded, "
                "edge, memory or server"
            )
        if (self.store_mode == "server" or self.qdrant_url) and not self.site_id:
            raise ValueError(
                "site policy key 'site-id' is required with a Qdrant server (store-mode=server or "
                "qdrant-url): stores are named by it, and sites sharing a server would otherwise "
                "share one name (their data folders' name, '/data' in the compose file)"
            )
        if self.max_epsilon < 0:
            raise ValueError(f"site policy key 'max-epsilon' = {self.max_epsilon}: must be >= 0")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"site policy key 'max-delta' = {self.max_delta}: must be in (0, 1)")
        if self.max_query_k < 0:
            raise ValueError(f"site policy key 'max-query-k' = {self.max_query_k}: must be >= 0")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


_POLICY_FIELDS = {_kebab(f.name): f for f in fields(SitePolicy)}
# Every key that only a site may set, plus names the run config used to carry for them.
SITE_KEYS = frozenset(_POLICY_FIELDS) | {
    "site-policy",
    "store-dir",
    "federated-query",
    "partition-id",
    "num-partitions",
}
# Settings fields that come from the site's policy, never from the coordinator.
STORE_FIELDS = {
    "store_dir": "store_path",
    "store_mode": "store_mode",
    "qdrant_url": "qdrant_url",
    "qdrant_api_key_env": "qdrant_api_key_env",
}


class SiteRefusal(Exception):
    """The coordinator asked for something only the site may decide. ``code`` names the key."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code, self.detail = code, detail


class ModelMismatch(Exception):
    """This site's resolved base weights differ from the server's."""


# Fixed error codes: the reply's Error carries (number, text), and nothing else.
CODES = {
    "data-error": 1001,
    "model-mismatch": 1002,
    "model-not-found": 1003,
    "config-error": 1004,
    "policy-error": 1005,
    "refused": 1006,
    "internal-error": 1099,
}


def load_policy(node_config: dict[str, Any], site_name: str = "") -> SitePolicy:
    """Policy = defaults < policy file (top level, then its ``[sites.NAME]`` table) < node config."""
    values: dict[str, Any] = {}
    source = node_config.get("site-policy") or os.environ.get(POLICY_ENV, "")
    if source:
        path = Path(str(source)).expanduser()
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"site policy file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"site policy file {path}: {err}") from None
        sites = data.pop("sites", {})
        values.update(_checked(data, str(path)))
        if site_name and site_name in sites:
            values.update(_checked(sites[site_name], f"{path} [sites.{site_name}]"))
    node = {k: v for k, v in node_config.items() if k in _POLICY_FIELDS}
    values.update(_checked(node, "--node-config"))
    if "qdrant-url" in values and "store-mode" not in values:
        values["store-mode"] = "server"
    return SitePolicy(**{_POLICY_FIELDS[k].name: v for k, v in values.items()})


def _checked(raw: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        field = _POLICY_FIELDS.get(key)
        if field is None:
            raise ValueError(
                f"{where}: unknown site policy key '{key}' (known: {', '.join(_POLICY_FIELDS)})"
            )
        kind = {"int": int, "bool": bool, "str": str}[str(field.type)]
        try:
            out[key] = _coerce(key, value, kind)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return out


def check_coordinator_config(run_config: dict[str, Any], message_config: dict[str, Any]) -> None:
    """Refuse a run or message that tries to set what only the site decides."""
    for where, config in (("run config", run_config), ("message config", message_config)):
        for key in sorted(config):
            if key in SITE_KEYS:
                raise SiteRefusal(
                    f"refused: {key}",
                    f"the {where} sets '{key}', which only this site's node config may set",
                )


def site_settings(
    run_config: dict[str, Any], message_config: dict[str, Any], policy: SitePolicy
) -> Settings:
    """Run config, then the message's config (e.g. FedProx's proximal-mu, the scaled lrs), then
    the site's store settings, which nothing from the coordinator can touch."""
    check_coordinator_config(run_config, message_config)
    s = settings_from({**run_config, **message_config})
    return s.replace(**{name: getattr(policy, attr) for name, attr in STORE_FIELDS.items()})


def check_training(s: Settings, policy: SitePolicy) -> None:
    """A fully trained query encoder's embedding rows change exactly for the tokens of this
    round's training questions: send it only if the site allows that."""
    if (
        s.mode in ("retriever", "both")
        and s.retriever_lora_r <= 0
        and not policy.allow_full_retriever
    ):
        raise SiteRefusal(
            "refused: retriever-lora-r",
            "retriever-lora-r=0 would send the full query encoder (its changed embedding rows "
            "reveal the tokens of this site's training questions); set allow-full-retriever=true "
            "in this site's node config to allow it",
        )

    if policy.max_epsilon > 0 and s.dp != "record":
        raise SiteRefusal(
            "refused: dp",
            f"this site's node config sets max-epsilon={policy.max_epsilon:g}: it trains only "
            f"with record-level DP (dp=record), the run asks dp={s.dp}",
        )
    # epsilon is accounted at the run's delta: a larger delta would make it look smaller
    if policy.max_epsilon > 0 and s.dp_delta > policy.max_delta:
        raise SiteRefusal(
            "refused: dp-delta",
            f"the run's dp-delta={s.dp_delta:g} exceeds this site's max-delta="
            f"{policy.max_delta:g}: its epsilon budget holds only at a delta this small or smaller",
        )


def query_k(requested: int, policy: SitePolicy) -> int:
    """Federated query: refused unless the site allows it; k capped by the site."""
    if not policy.allow_federated_query:
        raise SiteRefusal(
            "refused: federated-query",
            "a query message asks for retrieved text; this site's node config does not set "
            "allow-federated-query=true",
        )
    return max(0, min(int(requested), policy.max_query_k))


def node_client(node_config: dict[str, Any], policy: SitePolicy, s: Settings) -> ClientData:
    """Deployment: the site's ``data-path``. Simulation: ``partition-id`` picks one of the sorted
    client folders of ``data-root`` (the demo by default)."""
    if policy.data_path:
        client = resolve_clients([policy.data_path])[0]
        return ClientData(policy.site_id, client.folder) if policy.site_id else client
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has neither 'data-path' (deployment: flower-supernode --node-config "
            "\"data-path='...'\") nor 'partition-id' (simulation)"
        )
    clients = resolve_clients([s.data_root] if s.data_root else None)
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if num != len(clients):
        raise ValueError(
            f"{num} SuperNodes but {len(clients)} client folders in data-root "
            f"{s.data_root or '(demo)'}: run with num-supernodes={len(clients)}"
        )
    client = clients[pid]
    return ClientData(policy.site_id, client.folder) if policy.site_id else client


def site_name(node_config: dict[str, Any], run_config: dict[str, Any]) -> str:
    """The site's folder name, needed to pick its ``[sites.NAME]`` policy table."""
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).name
    if "partition-id" in node_config:
        data_root = str(run_config.get("data-root", "") or "")
        clients = resolve_clients([data_root] if data_root else None)
        pid = int(node_config["partition-id"])
        if 0 <= pid < len(clients):
            return clients[pid].name
    return ""


# ---- the site's own log, and error replies that carry a code only ---------------------------
def site_log(policy: SitePolicy, name: str) -> logging.Logger:
    """A logger writing to this site's private log file only (never to stdout or stderr)."""
    from fedrag_app.rag.store import default_store_dir

    path = Path(policy.log_path) if policy.log_path else None
    if path is None:
        folder = Path(policy.store_path) if policy.store_path else default_store_dir()
        path = folder / f"{name or 'site'}.site.log"
    path = path.expanduser().resolve()
    logger = logging.getLogger(f"fedrag_app.site.{path}")
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Flower's handlers print to the console, which the server sees
    return logger


def error_code(exc: BaseException) -> str:
    from fedrag_app.finetune.privacy import BudgetExceeded

    if isinstance(exc, SiteRefusal):
        return exc.code
    if isinstance(exc, BudgetExceeded):
        return "refused: privacy-budget"
    if isinstance(exc, ModelMismatch):
        return "model-mismatch"
    if isinstance(exc, DataError):
        return "data-error"
    from fedrag_app.rag.models import ModelNotFoundError

    if isinstance(exc, ModelNotFoundError):
        return "model-not-found"
    if isinstance(exc, ValueError):
        return "config-error"
    return "internal-error"


def error_reply(msg: Message, exc: BaseException, log: logging.Logger | None) -> Message:
    """The reply carries the fixed code only; the full error, with file and line, goes to the
    site's own log."""
    code = error_code(exc)
    if log is not None:
        detail = exc.detail if isinstance(exc, SiteRefusal) else ""
        log.error(
            "run %s, %s message: replied with error '%s'. %s\n%s",
            msg.metadata.run_id,
            msg.metadata.message_type,
            code,
            detail,
            "".join(traceback.format_exception(exc)),
        )
    number = CODES.get(code.split(":")[0], CODES["internal-error"])
    return Message(Error(code=number, reason=code), reply_to=msg)
