"""Copy a received state dict into trainable parameters (generator LoRA or query encoder)."""

from __future__ import annotations

import torch


def load_into(
    params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], what: str
) -> None:
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"{what} state lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.dtype))
