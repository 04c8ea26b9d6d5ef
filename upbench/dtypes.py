"""Floating-point dtypes from config strings (``float32``, ``fp16``, ``bf16``, ``torch.bfloat16``, ...)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import UpbenchError

FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float64": torch.float64, "double": torch.float64}


def parse_dtype(value: Any, owner: str = "dtype") -> Optional[torch.dtype]:
    """None stays None; a torch.dtype passes through; a name or alias becomes its floating-point dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in FLOAT_DTYPES:
        raise UpbenchError(f"{owner}: unknown dtype '{value}'; use one of {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[key]


#: what ``compute_dtype`` (config top level) accepts
COMPUTE_DTYPES = ("float32", "bf16", "fp16")


def reduced_dtype(value: Any, owner: str = "compute_dtype") -> Optional[torch.dtype]:
    """``compute_dtype``: None / float32 -> None (full precision); bf16 / fp16 (or their long names) -> the dtype
    autocast runs in."""
    if value is None:
        return None
    try:
        dtype = parse_dtype(value, owner)
    except UpbenchError:
        dtype = None
    if dtype is torch.float32:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise UpbenchError(f"{owner}={value}: expected one of {', '.join(COMPUTE_DTYPES)} (or null: float32)")
    return dtype
