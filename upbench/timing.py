"""Device-synchronised timing.  GPU kernels run asynchronously: a clock read right after a call measures the
launch, not the work.  Every timing in upbench goes through :class:`Stopwatch`, which synchronises the device the
work runs on (``cuda:1`` included) before starting and before stopping the clock."""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

import torch


def synchronize(device: Any) -> None:
    """Wait for the queued work on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no Apple GPU here
        torch.mps.synchronize()


class Stopwatch:
    """``with Stopwatch(device) as sw: work()`` -> ``sw.seconds``; the device is synchronised at both ends."""

    def __init__(self, device: Any = "cpu"):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


def median_ms(seconds: Sequence[float]) -> Optional[float]:
    """Median in milliseconds (robust to the first, slower calls); None when nothing was timed."""
    if not seconds:
        return None
    values = sorted(seconds)
    n = len(values)
    mid = values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
    return float(mid) * 1e3


def cuda_event_times(device: Any, fn, runs: int) -> List[float]:
    """Milliseconds of ``runs`` calls of ``fn`` measured with CUDA events recorded on ``device``'s stream."""
    device = torch.device(device)
    times = []
    with torch.cuda.device(device):
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    return times
