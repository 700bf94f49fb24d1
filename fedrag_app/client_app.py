"""Flower ClientApp: thin handlers over ``task``. Only weights and numbers leave the client."""

from __future__ import annotations

import resource
import time
from collections import OrderedDict

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrag_app import task
from fedrag_app.config import Settings
from fedrag_app.weights import nbytes, pack, unpack

app = ClientApp()
OPTIMIZER_STATE = "optimizer-state"  # key in context.state: this node's AdamW moments


def _setup(msg: Message, context: Context) -> tuple[Settings, task.ClientData]:
    node = dict(context.node_config)
    message_config = dict(msg.content.get("config", ConfigRecord()))
    s = task.site_settings(dict(context.run_config), message_config, node)
    return s, task.node_client(node, s)


def _load(msg: Message, context: Context, s: Settings):
    retriever, generator = task.load_models(s, cache_key=context.run_id)
    arrays = msg.content["arrays"]
    task.apply_states(unpack(arrays), retriever, generator)
    return retriever, generator, nbytes(arrays)


def _peak(context: Context) -> dict[str, float]:
    """Peak resident memory of this ClientApp process so far (Linux reports KiB), and the
    simulation partition id, so the history can name clients."""
    extra = {"peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if "partition-id" in context.node_config:
        extra["partition-id"] = float(context.node_config["partition-id"])
    return extra


@app.train()
def train(msg: Message, context: Context) -> Message:
    s, client = _setup(msg, context)
    config = msg.content["config"]
    # Flower counts rounds from 1 again after a resume; the ServerApp sends the rounds done before.
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    s = s.replace(seed=s.seed + server_round)  # new batches every round, still reproducible
    retriever, generator, down = _load(msg, context, s)
    # AdamW moments stay on this node (context.state lives in the SuperNode, across rounds)
    moments = None
    if s.keep_optimizer_state:
        saved = context.state.get(OPTIMIZER_STATE)
        moments = dict(saved.to_torch_state_dict()) if isinstance(saved, ArrayRecord) else {}
    metrics = task.train_local(
        [client], s, retriever, generator, False, server_round, optimizer_state=moments
    )
    if moments:
        context.state[OPTIMIZER_STATE] = ArrayRecord(OrderedDict(moments))
    arrays = pack(task.trainable_states(s.mode, retriever, generator), s.wire_dtype)
    metrics.update({"bytes-down": float(down), "bytes-up": float(nbytes(arrays)), **_peak(context)})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s, client = _setup(msg, context)
    retriever, generator, _ = _load(msg, context, s)
    start = time.perf_counter()
    summary, _ = task.evaluate_local([client], s, retriever, generator, progress=False)
    m = summary["overall"]
    metrics = {key: float(m[key]) for key in ("em", "f1", "recall_at_k", "mrr")}
    metrics.update(
        {"num-examples": float(m["n"]), "seconds": time.perf_counter() - start, **_peak(context)}
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Federated retrieval: this client's top-k chunk texts for a question. Off by default,
    because it sends retrieved text to the server."""
    s, client = _setup(msg, context)
    if not s.federated_query:
        raise PermissionError("federated-query is false: this client shares no retrieved text")
    retriever, generator = task.load_models(s, cache_key=context.run_id)
    if "arrays" in msg.content:
        task.apply_states(unpack(msg.content["arrays"]), retriever, generator)
    config = msg.content["config"]
    with task.open_store(client, s, retriever, progress=False) as store:
        vector = retriever.encode_queries([str(config["question"])])
        hits = store.search(vector, int(config.get("k", s.top_k)))[0]
    record = ConfigRecord({"texts": [h.text for h in hits], "scores": [h.score for h in hits]})
    return Message(content=RecordDict({"hits": record}), reply_to=msg)
