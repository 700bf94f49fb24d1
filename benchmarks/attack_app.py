"""A hostile-site ClientApp for the poisoning benchmark ONLY (benchmarks/dp_robust.py).

The app's own components (pyproject: fedrag_app.client_app:app) never load this module; the
benchmark copies the app into a scratch folder whose pyproject names ``attack_app:app``
instead. It is the real ClientApp plus a Flower mod that rewrites the train replies of the
sites whose simulation partition id is below ``$FEDRAG_ATTACK_SITES``:

- ``signflip``: global - scale x update (``$FEDRAG_ATTACK_SCALE``, default 10)
- ``noise``: global + Gaussian noise whose norm is the update's
- ``nan``: every weight NaN
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedrag_app import client_app

ATTACKS = ("signflip", "noise", "nan")


def attack(kind: str, received: np.ndarray, sent: np.ndarray, rng, scale: float) -> np.ndarray:
    """``received``: the global weights; ``sent``: the honest reply (weights, float32)."""
    update = sent - received
    if kind == "signflip":
        return received - scale * update
    if kind == "noise":
        noise = rng.standard_normal(update.shape)
        return received + noise * (np.linalg.norm(update) / max(np.linalg.norm(noise), 1e-12))
    if kind == "nan":
        return np.full_like(sent, np.nan)
    raise ValueError(f"unknown attack {kind!r} (one of {', '.join(ATTACKS)})")


def hostile_mod(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    kind = os.environ.get("FEDRAG_ATTACK", "")
    sites = int(os.environ.get("FEDRAG_ATTACK_SITES", "0"))
    partition = int(context.node_config.get("partition-id", -1))
    if msg.metadata.message_type != "train" or not kind or reply.has_error():
        return reply
    if not 0 <= partition < sites:
        return reply
    scale = float(os.environ.get("FEDRAG_ATTACK_SCALE", "10"))
    rng = np.random.default_rng(partition)
    received, arrays = msg.content["arrays"], reply.content["arrays"]
    out = {}
    for key, array in arrays.items():
        sent = array.numpy().astype(np.float32)
        glob = received[key].numpy().astype(np.float32)
        if array.numpy().dtype == np.float16:  # wire-dtype=float16: the reply is the update
            sent = glob + sent
        out[key] = Array(attack(kind, glob, sent, rng, scale).astype(np.float32))
    content = RecordDict({**reply.content, "arrays": ArrayRecord(out)})
    return Message(content=content, reply_to=msg)


app = ClientApp(mods=[hostile_mod])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
app.query()(client_app.query)
