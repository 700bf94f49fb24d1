"""Device and dtype options (CPU fp32 by default; CUDA and bf16/fp16 for GPUs)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "cpu") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' = 'cuda' but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str = "float32") -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"config key 'dtype' = {name!r}: expected {', '.join(DTYPES)}") from None
