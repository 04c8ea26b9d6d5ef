"""Progress bars for loops that take more than a few seconds (probe epochs, evaluation passes, sweep points, FID):
tqdm on a terminal, nothing when the output is a file or a pipe (logs and SLURM output stay clean)."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional


def enabled() -> bool:
    if os.environ.get("UPBENCH_PROGRESS") in ("0", "false", "no"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
        show: Optional[bool] = None, **kwargs: Any):
    """``tqdm(iterable, ...)`` on a terminal; a silent pass-through otherwise (``show=False``: always silent)."""
    from tqdm import tqdm

    on = enabled() if show is None else (show and enabled())
    return tqdm(iterable, total=total, desc=desc, disable=not on, leave=False, dynamic_ncols=True, **kwargs)
