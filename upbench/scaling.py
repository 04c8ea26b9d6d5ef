"""``upbench sweep scaling``: forward time, peak memory and FLOPs of upsamplers versus token count.

Every (upsampler, size) point runs in a fresh worker process, so that
  * peak memory is the point's own: on CPU the rise of the worker's peak RSS (``VmHWM``, reset just before the
    first forward) over its RSS with the model and inputs built; on GPU ``torch.cuda.max_memory_allocated``
    over what was allocated before the forward;
  * the memory cap binds one point only: on CPU an address-space limit (``RLIMIT_AS``) of the worker's size
    plus the cap; on GPU the process's memory fraction;
  * a crash, an out-of-memory kill or a hang loses one point, never the sweep.
On a CPU the workers are forked from a server process that imported torch and the upsamplers once (a forked child
has its own address space, allocator and limits, like a new process, without ~3 s of imports per point); on a GPU,
or with ``worker_start=exec``, each point is a new ``python -m upbench.scaling SPEC`` process.
The first forward gives peak memory and a time estimate, the second (under ``torch.utils.flop_counter``) the
FLOPs; both count as warm-ups.  The other warm-ups and the timed runs follow unless the first forward shows
they would exceed the point's time limit.  Rows go to the
same store as ``upbench run``; points with a row are not recomputed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import results
from .config import load_yaml, resolve_device
from .dtypes import parse_dtype
from .errors import UpbenchError
from .registry import UPSAMPLERS
from .schema import build_row
from .timing import cuda_event_times, synchronize

CPU_DEFAULTS = {"memory_limit_gb": 8.0, "time_limit_s": 60.0}
GPU_DEFAULTS = {"memory_limit_gb": 24.0, "time_limit_s": 600.0}
#: statuses after which the larger sizes of that upsampler are not tried
STOP_STATUSES = ("oom", "timeout", "error")
#: what varies along a curve: the image side (tokens), the upsampling factor at one image side (ratio: the output is
#: ratio x the feature grid, the image stays, as NAF's efficiency tests), the channel count at one image side
AXES = ("tokens", "ratio", "channels")
#: forward: inference; backward: forward + backward of the output's sum in train mode, with gradients for the
#: upsampler's parameters and the input features (an upsampler's training step; parameter-free methods: features)
PASSES = ("forward", "backward")
RESULT_TAG = "UPBENCH_POINT "
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc",
                "failed to allocate", "memoryerror")


# ----------------------------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------------------------
def _auto(value: Any, default: float, key: str = "") -> float:
    """``auto`` / null -> the default; otherwise a positive finite number (one line naming ``key`` if not)."""
    if value in (None, "auto"):
        return float(default)
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, bool) or not math.isfinite(out) or out <= 0:
        raise UpbenchError(f"{key}={value}: expected a positive number or auto")
    return out


def resolve(cfg: Dict[str, Any], quick: bool = False) -> Dict[str, Any]:
    """The sweep config with every ``auto`` filled in: device, threads, limits, channels / patch, upsamplers."""
    from .pipeline import backbone_shape

    s = {k: v for k, v in cfg.items() if k != "quick"}
    if quick:
        s.update(cfg.get("quick") or {})
    s["quick"] = bool(quick)
    device = resolve_device(s.get("device", "auto"))
    s["device"] = str(device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    s["memory_limit_gb"] = _auto(s.get("memory_limit_gb"), defaults["memory_limit_gb"], "memory_limit_gb")
    s["time_limit_s"] = _auto(s.get("time_limit_s"), defaults["time_limit_s"], "time_limit_s")
    s["worker_timeout_s"] = _auto(s.get("worker_timeout_s"), max(120.0, 10 * s["time_limit_s"]), "worker_timeout_s")
    s["threads"] = int(s.get("threads") or torch.get_num_threads())
    for key in ("warmup", "runs"):
        if int(s[key]) < 1:
            raise UpbenchError(f"sweep.{key} must be >= 1, got {s[key]}")
    channels, patch = backbone_shape(s["backbone"])
    s["channels"], s["patch_size"] = channels, patch
    names = s.get("upsamplers", "all")
    available = UPSAMPLERS.available()
    if names in (None, "all"):
        names = [n for n in available if n not in set(s.get("exclude") or [])]
    elif isinstance(names, str):
        names = [n for n in names.split(",") if n]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UpbenchError(f"unknown upsampler(s) {', '.join(unknown)}; available: {', '.join(available)}")
    s["upsamplers"] = list(names)
    key = "quick.sizes" if quick and "sizes" in (cfg.get("quick") or {}) else "sizes"
    if not isinstance(s["sizes"], (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in s["sizes"]):
        raise UpbenchError(f"{key}={s['sizes']}: expected a list of image sides in px, e.g. sizes=[224,448]")
    sizes = sorted(set(s["sizes"]))
    if not sizes or sizes[0] < patch:
        raise UpbenchError(f"{key}={s['sizes']}: expected a non-empty list of image sides >= the patch size {patch}")
    s["sizes"] = sizes
    s["axes"] = _names_list(s.get("axes", ["tokens"]), AXES, "axes")
    s["passes"] = _names_list(s.get("passes", ["forward"]), PASSES, "passes")
    for axis, values_key in (("ratio_axis", "factors"), ("channel_axis", "values")):
        sec = dict(s.get(axis) or {})
        vals = sec.get(values_key)
        where = f"{axis}.{values_key}"
        if not isinstance(vals, (list, tuple)) or not vals or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals):
            raise UpbenchError(f"{where}={vals}: expected a non-empty list of positive integers")
        side = sec.get("size")
        if not isinstance(side, int) or isinstance(side, bool) or side < patch:
            raise UpbenchError(f"{axis}.size={side}: expected an image side in px >= the patch size {patch}")
        sec[values_key] = sorted(set(vals))
        s[axis] = sec
    return s


def _names_list(value: Any, valid: Sequence[str], key: str) -> List[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    bad = [str(n) for n in names if n not in valid]
    if bad or not names:
        raise UpbenchError(f"{key}={value}: expected a list of {', '.join(valid)}")
    return list(dict.fromkeys(names))


def plan(s: Dict[str, Any]) -> List[Tuple[str, str, List[Tuple[int, int, int, int]]]]:
    """(axis, pass, points) per curve; a point is (image side, feature grid, output side, channels), in increasing
    cost along the axis."""
    p, C = s["patch_size"], s["channels"]
    curves = []
    for axis in s["axes"]:
        if axis == "tokens":
            points = [(z // p * p, z // p, z // p * p, C) for z in s["sizes"]]
        elif axis == "ratio":
            side = s["ratio_axis"]["size"]
            points = [(side // p * p, side // p, side // p * r, C) for r in s["ratio_axis"]["factors"]]
        else:
            side = s["channel_axis"]["size"] // p * p
            points = [(side, side // p, side, c) for c in s["channel_axis"]["values"]]
        for pass_ in s["passes"]:
            curves.append((axis, pass_, points))
    return curves


def device_label(device: str) -> Dict[str, str]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(dev)}
    import platform

    return {"type": "cpu", "name": _cpu_name() or platform.machine()}


def _cpu_name() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def point_config(s: Dict[str, Any], name: str, size: int, device: Dict[str, str], axis: str = "tokens",
                 pass_: str = "forward", output: Optional[int] = None,
                 channels: Optional[int] = None) -> Dict[str, Any]:
    """Everything that decides a point's numbers (hashed into its row key).  The defaults are a tokens-axis
    forward point: image ``size``, features size // patch, output = the image."""
    kwargs = upsampler_kwargs(s, name)
    grid = size // s["patch_size"]
    pcfg = {
        "task": "scaling", "tag": s.get("tag"),
        "upsampler": {"name": name, "kwargs": kwargs},
        "backbone": {"name": s["backbone"]["name"], "channels": int(channels or s["channels"]),
                     "patch_size": s["patch_size"]},
        "size": grid * s["patch_size"], "grid": grid, "batch": int(s["batch"]), "dtype": str(s["dtype"]),
        "warmup": int(s["warmup"]), "runs": int(s["runs"]), "memory_limit_gb": s["memory_limit_gb"],
        "time_limit_s": s["time_limit_s"], "device": device, "cpu_threads": s["threads"], "seed": int(s["seed"]),
    }
    # only off the default curve: a tokens-axis forward point keeps the key it has always had
    if axis != "tokens" or pass_ != "forward" or (output is not None and output != pcfg["size"]):
        pcfg.update(axis=axis, **{"pass": pass_}, output=int(output or pcfg["size"]))
    return pcfg


def point_axis(pcfg: Dict[str, Any]) -> Tuple[str, str, int, int]:
    """(axis, pass, output side, x) of a point config: x is the value that varies along its curve."""
    axis, pass_ = pcfg.get("axis", "tokens"), pcfg.get("pass", "forward")
    output = int(pcfg.get("output", pcfg["size"]))
    x = {"tokens": pcfg["grid"] ** 2, "ratio": output // max(1, pcfg["grid"]),
         "channels": pcfg["backbone"]["channels"]}[axis]
    return axis, pass_, output, x


def upsampler_kwargs(s: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The upsampler's own config kwargs (as ``upbench run`` uses them), then the sweep's ``kwargs.<name>``."""
    kwargs: Dict[str, Any] = dict(load_yaml("upsampler", name).get("kwargs") or {})
    kwargs.update((s.get("kwargs") or {}).get(name) or {})
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# orchestration (parent process)
# ----------------------------------------------------------------------------------------------------------------
def run_sweep(cfg: Dict[str, Any], quick: bool = False, log=None) -> List[Dict[str, Any]]:
    """Run (or reuse) every point; returns the rows of this sweep in plan order."""
    log = log or logging.getLogger("upbench").info
    s = resolve(cfg, quick)
    store = results.ResultStore(s["paths"]["results"])
    device = device_label(s["device"])
    log(f"sweep scaling: {len(s['upsamplers'])} upsamplers x sizes {s['sizes']} (patch {s['patch_size']}, "
        f"C={s['channels']}), axes {','.join(s['axes'])}, passes {','.join(s['passes'])}, {s['warmup']} warm-up + "
        f"{s['runs']} runs, {device['type']} '{device['name']}', {s['threads']} threads, cap "
        f"{s['memory_limit_gb']:g} GB, {s['time_limit_s']:g} s per point")
    rows: List[Dict[str, Any]] = []
    server = WorkerServer.start(s) if _forks(s) else None
    try:
        _run_points(s, store, device, server, rows, log)
    finally:
        if server is not None:
            server.close()
    return rows


def _forks(s: Dict[str, Any]) -> bool:
    how = s.get("worker_start") or "auto"
    if how not in ("auto", "fork", "exec"):
        raise UpbenchError(f"unknown worker_start '{how}'; valid: auto, fork, exec")
    can = hasattr(os, "fork") and torch.device(s["device"]).type == "cpu"
    if how == "fork" and not can:
        raise UpbenchError("worker_start=fork needs a CPU sweep on a system with fork(); use worker_start=exec")
    return can and how != "exec"


def _run_points(s, store, device, server, rows, log) -> None:
    from .progress import bar

    curves = plan(s)
    points = bar(total=len(s["upsamplers"]) * sum(len(c[2]) for c in curves), desc="sweep points")
    for name in s["upsamplers"]:
        family = getattr(UPSAMPLERS.get(name), "family", "learned")
        for axis, pass_, pts in curves:
            for size, _grid, output, channels in pts:
                points.update(1)
                pcfg = point_config(s, name, size, device, axis, pass_, output, channels)
                key = results.config_hash(pcfg)
                what = _point_label(pcfg)
                if store.exists(key) and not s.get("force"):
                    row = store.read(key)
                    log(f"  [done] {name:>9} {what}: {_short(row)}")
                else:
                    row = measure_point(pcfg, key, family, s, server)
                    store.write(row)
                    log(f"  [new]  {name:>9} {what}: {_short(row)}")
                rows.append(row)
                if row["status"] in STOP_STATUSES:
                    rest = pts[pts.index((size, _grid, output, channels)) + 1:]
                    if rest:
                        what = {"tokens": ("sizes", 0), "ratio": ("ratios", None), "channels": ("channels", 3)}[axis]
                        xs = [p[what[1]] if what[1] is not None else p[2] // max(1, p[1]) for p in rest]
                        log(f"  [skip] {name:>9} {what[0]} {xs}{'' if pass_ == 'forward' else ' (' + pass_ + ')'}: "
                            f"stopped by {row['status']} at {_point_label(pcfg).strip()}")
                    break


def _point_label(pcfg: Dict[str, Any]) -> str:
    axis, pass_, output, x = point_axis(pcfg)
    suffix = "" if pass_ == "forward" else f" ({pass_})"
    if axis == "ratio":
        return f"ratio {x:>3}x ({pcfg['grid']}^2 -> {output} px){suffix}"
    if axis == "channels":
        return f"C={x:>5} ({pcfg['size']} px){suffix}"
    return f"{x:>6} tokens{suffix}"


def _short(row: Dict[str, Any]) -> str:
    t, m = row.get("timing") or {}, row.get("memory") or {}
    parts = [row["status"]]
    if t.get("median_ms") is not None:
        parts.append(f"{t['median_ms']:.1f} ms (n={t['runs']})")
    if m.get("peak_mb") is not None:
        parts.append(f"{m['peak_mb']:.0f} MB")
    if row.get("error"):
        parts.append(row["error"][:120])
    return ", ".join(parts)


def _worker_env(s: Dict[str, Any]) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(s["threads"]), MKL_NUM_THREADS=str(s["threads"]))


def measure_point(pcfg: Dict[str, Any], key: str, family: str, s: Dict[str, Any],
                  server: Optional["WorkerServer"] = None) -> Dict[str, Any]:
    """Run one point in a fresh worker (forked by ``server`` when given, else a new process) and turn its report
    into a result row."""
    spec = {**pcfg, "device_str": s["device"]}
    axis, pass_, output, x = point_axis(pcfg)
    t0 = time.perf_counter()
    outcome = server.run(spec, s["worker_timeout_s"]) if server is not None else None
    if outcome is None:   # no server, or it is gone: a new process for this point
        try:
            proc = subprocess.run([sys.executable, "-m", "upbench.scaling", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=s["worker_timeout_s"], env=_worker_env(s))
            outcome = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "timeout": False,
                       "worker": "exec"}
        except subprocess.TimeoutExpired:
            outcome = {"timeout": True, "worker": "exec"}
    if outcome["timeout"]:
        report = {"status": "timeout", "error": f"worker killed after {s['worker_timeout_s']:g} s"}
    else:
        report = _parse_report(outcome["stdout"]) or _crash_report(outcome["returncode"], outcome["stderr"])
    wall = time.perf_counter() - t0
    times = report.get("times_ms") or []
    timing: Dict[str, Any] = {"runs": len(times), "warmup": report.get("warmup_done", 0),
                              "clock": report.get("clock"), "first_ms": report.get("first_ms"), "times_ms": times,
                              "worker": outcome["worker"], "load_start": report.get("load_start"),
                              "load_end": report.get("load_end"), "cpu_count": cpu_count()}
    if times:
        qs = _quantiles(times)
        timing.update(median_ms=qs[1], iqr_ms=qs[2] - qs[0], mean_ms=sum(times) / len(times), min_ms=min(times))
    return build_row(
        pcfg, key, report["status"], timing=timing,
        memory={"peak_mb": report.get("peak_mb"), "method": report.get("memory_method"),
                "limit_gb": pcfg["memory_limit_gb"]},
        data={"size": pcfg["size"], "grid": pcfg["grid"], "tokens": pcfg["grid"] ** 2, "pixels": output ** 2,
              "batch": pcfg["batch"], "family": family, "gflops": report.get("gflops"), "axis": axis,
              "pass": pass_, "output": output, "ratio": output / pcfg["grid"],
              "channels": pcfg["backbone"]["channels"], "x": x},
        params={"upsampler": report.get("params", 0)}, error=report.get("error"), versions=results.versions(),
        device={**pcfg["device"], "threads": report.get("threads", pcfg["cpu_threads"]),
                "omp_wait_policy": _worker_env(s).get("OMP_WAIT_POLICY")},
        wall_s=round(wall, 2), finished=results.now())


def _quantiles(values: Sequence[float]) -> Tuple[float, float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _parse_report(stdout: str) -> Optional[Dict[str, Any]]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def _crash_report(returncode: int, stderr: str) -> Dict[str, Any]:
    tail = " | ".join(stderr.strip().splitlines()[-3:])[-400:]
    if returncode == -9:  # SIGKILL: the kernel's OOM killer (the cap did not bind first)
        return {"status": "oom", "error": f"worker killed by SIGKILL (out of memory?) {tail}".strip()}
    if any(m in stderr.lower() for m in _OOM_MARKERS):
        return {"status": "oom", "error": tail}
    return {"status": "error", "error": f"worker exited with {returncode}: {tail}"}


# ----------------------------------------------------------------------------------------------------------------
# the worker (one point, fresh process)
# ----------------------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()  # MemoryError() has no message at all
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MARKERS) or \
        type(exc).__name__ == "OutOfMemoryError"


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import resource

    from .pipeline import check_output

    torch.manual_seed(int(spec["seed"]))
    torch.set_num_threads(int(spec["cpu_threads"]))
    device = torch.device(spec["device_str"])
    dtype = parse_dtype(spec["dtype"], "sweep")
    C, p, g = spec["backbone"]["channels"], spec["backbone"]["patch_size"], spec["grid"]
    B, size = int(spec["batch"]), int(spec["size"])
    out_side = int(spec.get("output", size))
    backward = spec.get("pass", "forward") == "backward"
    model = UPSAMPLERS.create(spec["upsampler"]["name"], in_channels=C, patch_size=p, **spec["upsampler"]["kwargs"])
    model = model.to(device=device, dtype=dtype)
    # backward: the training step's cost (train mode, gradients for the weights and the input features)
    model = model.train().requires_grad_(True) if backward else model.eval().requires_grad_(False)
    image = torch.randn(B, 3, size, size, device=device, dtype=dtype)
    feats = torch.randn(B, C, g, g, device=device, dtype=dtype, requires_grad=backward)

    def step(img: torch.Tensor, f: torch.Tensor, hw: Tuple[int, int]) -> Optional[torch.Tensor]:
        if not backward:
            with torch.inference_mode():
                return model(img, f, hw)
        model.zero_grad(set_to_none=True)
        f.grad = None
        model(img, f, hw).float().sum().backward()
        return None
    out: Dict[str, Any] = {"params": int(sum(t.numel() for t in model.parameters())),
                           "threads": torch.get_num_threads()}
    cap = float(spec["memory_limit_gb"]) * 2 ** 30
    cuda = device.type == "cuda"

    def sync() -> None:
        synchronize(device)

    # a tiny forward first, so that lazy initialisation (thread pools, kernel caches) is not counted as the
    # point's memory; a model that rejects the tiny shape is simply measured cold
    tiny = min(g, 2)
    try:
        step(torch.randn(B, 3, tiny * p, tiny * p, device=device, dtype=dtype),
             torch.randn(B, C, tiny, tiny, device=device, dtype=dtype, requires_grad=backward), (tiny * p, tiny * p))
    except Exception:  # noqa: BLE001
        pass
    hw = (out_side, out_side)

    # ---- first forward: peak memory and the time estimate.  It runs before anything large has been freed in
    # this process, so the allocator has no retained memory to hide the rise of the peak RSS.
    if cuda:
        sync()
        total = torch.cuda.get_device_properties(device).total_memory
        base = torch.cuda.memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (base + cap) / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        out["memory_method"] = "cuda_max_memory_allocated"
    else:
        base_kb = _proc_status_kb("VmRSS") or 0
        size_kb = _proc_status_kb("VmSize")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if cap > 0 and size_kb:
            resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + int(cap), hard))
        out["memory_method"] = "rss_hwm" if _reset_peak_rss() else "ru_maxrss"
    try:
        sync()
        t0 = time.perf_counter()
        y = step(image, feats, hw)
        sync()
        first = time.perf_counter() - t0
        if y is not None:
            try:
                check_output(y, feats, hw)
            except UpbenchError as exc:
                return {**out, "status": "error", "error": str(exc)}
        del y
    except BaseException as exc:  # noqa: BLE001  (an allocation failure may surface as several types)
        if _is_oom(exc):
            return {**out, "status": "oom", "error": _first_line(exc)}
        raise
    if cuda:
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    else:
        if out["memory_method"] == "rss_hwm":
            peak_kb = _proc_status_kb("VmHWM") or 0
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_mb"] = max(0, peak_kb - base_kb) / 1024
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # the counter below loads modules lazily

    # ---- FLOPs (matmul / conv ops) from one more forward under the counter; it also serves as a warm-up
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(image, feats, hw)
    out["gflops"] = counter.get_total_flops() / 1e9
    out["first_ms"] = first * 1e3
    out["clock"] = "cuda_events" if cuda else "perf_counter"
    warmup, runs = int(spec["warmup"]), int(spec["runs"])
    more = max(0, warmup - 2) + runs  # the two forwards above are the first warm-ups
    if first * more > float(spec["time_limit_s"]):
        return {**out, "status": "time_limit", "times_ms": [first * 1e3], "warmup_done": 0,
                "error": f"{more} more forwards at {first:.1f} s exceed time_limit_s={spec['time_limit_s']:g}; "
                         "timed once"}

    # ---- warm-ups and timed runs, with the machine's load around them (a loaded machine makes times untrustworthy)
    out["load_start"] = _load_average()
    times: List[float] = []
    try:
        for _ in range(max(0, warmup - 2)):
            step(image, feats, hw)
        sync()
        if cuda:
            times = cuda_event_times(device, lambda: step(image, feats, hw), runs)
        for _ in range(0 if cuda else runs):
            t0 = time.perf_counter()
            step(image, feats, hw)
            times.append((time.perf_counter() - t0) * 1e3)
    except BaseException as exc:  # noqa: BLE001
        if _is_oom(exc):
            return {**out, "status": "oom", "error": _first_line(exc)}
        raise
    out["load_end"] = _load_average()
    return {**out, "status": "ok", "times_ms": times, "warmup_done": max(warmup, 2)}


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class WorkerServer:
    """``python -m upbench.scaling --server``: imports torch, its FLOP counter and every upsampler once, then for each
    point spec it receives (one JSON line on stdin) forks a child that runs :func:`worker` with its stdout / stderr
    in files, waits for it (killing it past the timeout) and answers one JSON line: the child's exit code, output
    and whether it timed out.  The server itself never runs a tensor operation, so every child starts as a new
    worker process would: no thread pool, no allocator state, no memory limit of an earlier point."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls, s: Dict[str, Any]) -> Optional["WorkerServer"]:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "upbench.scaling", "--server"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_worker_env(s))
        except OSError:
            return None
        server = cls(proc)
        return server if server._read() == {"ready": True} else server.close()

    def _read(self) -> Optional[Dict[str, Any]]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        try:
            return json.loads(line) if line else None
        except json.JSONDecodeError:
            return None

    def run(self, spec: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        """The forked worker's outcome, or None when the server is gone (the caller then starts a process)."""
        if self.proc.poll() is not None:
            return None
        try:
            self.proc.stdin.write(json.dumps({"spec": spec, "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None
        reply = self._read()
        return None if reply is None else {**reply, "worker": "fork"}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
        return None


def _child(spec: Dict[str, Any], out_path: str, err_path: str) -> None:
    """In the forked child: stdout / stderr to files, run the point, leave without returning to the server."""
    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        main([json.dumps(spec)])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (reported through stderr, as a crashing process would)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _release_free_heap() -> None:
    """Return the memory the imports freed to the OS (glibc ``malloc_trim``), so a child's first forward cannot reuse
    already-resident heap pages unnoticed by its peak-RSS measurement."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def serve() -> None:
    import signal
    import tempfile

    import torch.utils.flop_counter  # noqa: F401  (with torch._dynamo, which it loads: the slow imports)
    import torch._dynamo  # noqa: F401

    UPSAMPLERS.available()   # every upsampler module imported once
    _release_free_heap()
    protocol = os.fdopen(os.dup(1), "w")   # the replies; anything else written to stdout goes to stderr
    os.dup2(2, 1)
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory(prefix="upbench-point-") as tmp:
            out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["spec"], out_path, err_path)
            deadline, timed_out = time.monotonic() + float(request["timeout"]), False
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    timed_out = True
                    break
                time.sleep(0.005)
            read = [Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in (out_path, err_path)]
            protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timeout": timed_out,
                                       "stdout": read[0], "stderr": read[1]}) + "\n")
            protocol.flush()


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--server"]:
        serve()
        return
    if len(argv) != 1:
        print("usage: python -m upbench.scaling '<point spec JSON>' (run by upbench sweep scaling)", file=sys.stderr)
        sys.exit(2)
    report = worker(json.loads(argv[0]))
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
