"""Trainable state <-> ONE Flower ArrayRecord (Flower's strategies take one per reply).

Keys carry a component prefix, ``gen.`` for the generator's LoRA tensors and ``ret.`` for the
query encoder, so one record holds both. bfloat16 cannot travel in an ArrayRecord: tensors are
sent as float32 or float16 (``wire-dtype``) and cast back to each parameter's dtype on load.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PREFIXES = {"generator": "gen.", "retriever": "ret."}
WIRE = {"float32": np.float32, "float16": np.float16}


def components(mode: str) -> tuple[str, ...]:
    """What a mode trains, hence what travels: nothing frozen is ever sent."""
    return {"generator": ("generator",), "retriever": ("retriever",)}.get(
        mode, ("generator", "retriever")
    )


def pack(states: dict[str, dict[str, torch.Tensor]], wire_dtype: str = "float32") -> ArrayRecord:
    arrays: OrderedDict[str, Array] = OrderedDict()
    for component, state in states.items():
        prefix = PREFIXES[component]
        for key, tensor in state.items():
            data = tensor.detach().to(torch.float32).cpu().numpy().astype(WIRE[wire_dtype])
            arrays[prefix + key] = Array(data)
    return ArrayRecord(arrays)


def pack_reply(
    states: dict[str, dict[str, torch.Tensor]],
    received: dict[str, dict[str, torch.Tensor]],
    wire_dtype: str = "float32",
) -> ArrayRecord:
    """What a client sends back: its weights in float32, or with ``wire-dtype=float16`` its
    UPDATE (trained minus received) in float16, which keeps updates far below a float16 step
    of the weights themselves; the server adds it back onto its float32 global model
    (``strategies.Float32Global``)."""
    if wire_dtype == "float32":
        return pack(states, "float32")
    delta = {
        component: {k: t.detach().float().cpu() - received[component][k] for k, t in state.items()}
        for component, state in states.items()
    }
    return pack(delta, wire_dtype)


def unpack(record: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        for component, prefix in PREFIXES.items():
            if key.startswith(prefix):
                tensor = torch.from_numpy(np.array(array.numpy(), dtype=np.float32, copy=True))
                states.setdefault(component, {})[key[len(prefix) :]] = tensor
                break
        else:
            raise KeyError(f"array {key!r} has no known prefix ({', '.join(PREFIXES.values())})")
    return states


def nbytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())
