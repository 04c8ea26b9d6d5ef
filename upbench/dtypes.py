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
