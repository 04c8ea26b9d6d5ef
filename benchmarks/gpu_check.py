"""The one-shot GPU check (run through ``benchmarks/gpu_check.sh``, which installs what is missing first).

    bash benchmarks/gpu_check.sh                         # on a machine with a GPU: well under 8 minutes on one H200
    bash benchmarks/gpu_check.sh --device cpu --quick    # dry run of every step on the CPU (what CI runs)

Everything goes to one folder (``--out``, default ``gpu_check_out/<time>``):

* ``golden.json``   parity with the official implementations on every golden case, on the device, TF32 off;
* ``launches.json`` kernels, host-device syncs and host-to-device copies per forward of every upsampler at DINOv2-S/14
  448 px shapes and at 1024 px / patch 16, counted on the device (on the CPU dry run: on ``meta`` with the
  accelerator path, i.e. what a GPU would launch);
* ``forward.json``  forward time (CUDA events, median) and peak memory of every upsampler at both sizes;
* ``scaling.json`` / ``scaling.png`` a reduced scaling sweep (forward and backward time / peak memory against tokens,
  then against the upsampling ratio and the channel count) under the memory cap (``--cap-gb``, default 24);
* ``summary.json``  the figures the papers quote (UPLiFT/bilinear at 448 px, UPLiFT against the cross-attention
  methods at 1024 tokens, UPLiFT's log-log slope in tokens, the most tokens each method reaches under the cap) and
  how long each step took.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from upbench import upsamplers
from upbench.launches import forward_launches
from upbench.timing import Stopwatch, cuda_event_times, median_ms
from upbench.upsamplers.base import kernel_path

ROOT = Path(__file__).resolve().parents[1]
FEATURE_UPSAMPLERS = [n for n in upsamplers.available() if n != "uplift_vae"]
CROSS_ATTENTION = ("jafar", "anyup", "loftup")
LEARNED = ("uplift", "jafar", "anyup", "loftup", "featup", "lift_2x")
#: (label, image side, feature grid, patch size): the GPU audit's shapes
SIZES = [("448", 448, 32, 14), ("1024", 1024, 64, 16)]
QUICK_SIZES = [("56", 56, 4, 14), ("64", 64, 4, 16)]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                            "threads": torch.get_num_threads(), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def golden(device: torch.device, folder: Path, quick: bool) -> List[Dict[str, Any]]:
    """Every golden case on ``device`` (the device's own path), compared with the official outputs (1e-4)."""
    from upbench.errors import UpbenchError

    cases = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    out, seen = [], set()
    for path in cases:
        case = torch.load(path, weights_only=True)
        method = case["method"]
        if quick and method in seen:
            continue
        seen.add(method)
        try:
            cls = upsamplers.for_official_method(method)
        except UpbenchError:
            out.append({"case": path.stem, "method": method, "status": "skipped", "reason": "method not implemented"})
            continue
        model = cls.from_official(method, case["constructor"])
        model.load_official_state_dict(case["state_dict"], what=f"golden {path.name}", strict=True)
        model = model.to(device).eval()
        with torch.no_grad():
            got = model.run_official(method, _to(case["inputs"], device), case["constructor"])
        errors = {name: float((got[name].float().cpu() - ref).abs().max()) for name, ref in case["expected"].items()}
        ok = all(torch.allclose(got[name].float().cpu(), ref, atol=1e-4, rtol=1e-4)
                 for name, ref in case["expected"].items())
        out.append({"case": path.stem, "method": method, "status": "pass" if ok else "FAIL",
                    "max_abs_err": max(errors.values()) if errors else None})
    return out


def _inputs(device: torch.device, side: int, grid: int, channels: int = 384, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, side, side, generator=gen).to(device)
    feats = torch.randn(batch, channels, grid, grid, generator=gen).to(device)
    return image, feats


def launches(device: torch.device) -> List[Dict[str, Any]]:
    """Per forward, at the audit's shapes: on a GPU counted on the device; on the CPU counted on ``meta`` with the
    accelerator path (nothing computed: the shapes can be full size)."""
    rows = []
    for name in FEATURE_UPSAMPLERS:
        for label, side, grid, patch in SIZES:
            torch.manual_seed(0)
            model = upsamplers.create(name, in_channels=384, patch_size=patch)
            where = "meta (accelerator path)" if device.type == "cpu" else str(device)
            with kernel_path("device" if device.type == "cpu" else "auto"):
                got = forward_launches(model, (1, 3, side, side), (1, 384, grid, grid), (side, side),
                                       "meta" if device.type == "cpu" else device)
            rows.append({"upsampler": name, "size": label, "counted_on": where, **got.as_dict()})
    return rows


def _time(device: torch.device, fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up: allocator, cuDNN heuristics, caches
    if device.type == "cuda":  # CUDA events on the device's stream: the work, not the launches
        return median_ms([t / 1e3 for t in cuda_event_times(device, fn, runs)])
    seconds = []
    for _ in range(runs):
        with Stopwatch(device) as sw:
            fn()
        seconds.append(sw.seconds)
    return median_ms(seconds)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device, base: int) -> Optional[float]:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, 1)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(device: torch.device, name: str, side: int, grid: int, patch: int, out: Sequence[int], runs: int,
            channels: int = 384, backward: bool = False) -> Dict[str, Any]:
    """Forward (and, with ``backward``, forward + backward of the output's sum) time and peak memory."""
    row: Dict[str, Any] = {"upsampler": name, "image": side, "grid": grid, "tokens": grid * grid,
                           "channels": channels, "output": list(out)}
    model = image = feats = None
    try:
        torch.manual_seed(0)
        model = upsamplers.create(name, in_channels=channels, patch_size=patch).to(device).eval()
        image, feats = _inputs(device, side, grid, channels)
        _peak_reset(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        def forward():
            with torch.inference_mode():
                return model(image, feats, tuple(out))

        row["forward_ms"] = round(_time(device, forward, runs), 3)
        row["forward_peak_mb"] = _peak_mb(device, base)
        if backward and any(p.requires_grad for p in model.parameters()):
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                model(image, feats, tuple(out)).float().sum().backward()

            _peak_reset(device)
            row["train_step_ms"] = round(_time(device, step, max(1, runs // 2)), 3)
            row["train_peak_mb"] = _peak_mb(device, base)
        row["status"] = "ok"
    except Exception as exc:  # a point that does not fit is a result ("oom"), not the end of the check
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    finally:
        model = image = feats = None  # free the point's tensors before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def forward_times(device: torch.device, quick: bool) -> List[Dict[str, Any]]:
    runs = 1 if quick else 10
    rows = []
    for name in FEATURE_UPSAMPLERS:
        for label, side, grid, patch in (QUICK_SIZES if quick else SIZES):
            row = measure(device, name, side, grid, patch, (side, side), runs)
            rows.append({"size": label, **row})
            log(f"forward {name} @{label}: {row.get('forward_ms')} ms, {row.get('forward_peak_mb')} MB "
                f"{row['status']}")
    return rows


def scaling(device: torch.device, quick: bool, cap_gb: float, point_limit_s: float) -> List[Dict[str, Any]]:
    """Tokens (image side at patch 14, output = image), then upsampling ratio (32x32 features, output 2x..16x), then
    channels (448 px); a method stops growing after a point that runs out of memory or takes too long."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2 ** 30 / total), device)
    names = [n for n in ("bilinear", "uplift", "jafar", "anyup", "loftup", "featup", "lift_2x")
             if n in FEATURE_UPSAMPLERS]
    grids = [2, 4] if quick else [16, 24, 32, 40, 51, 64, 80, 96, 128]
    ratios = [2] if quick else [2, 4, 8, 14, 16]
    channels = [16] if quick else [64, 128, 384, 768, 1024]
    runs = 1 if quick else 5
    rows = []
    for name in names:
        for grid in grids:
            side = grid * 14
            row = measure(device, name, side, grid, 14, (side, side), runs, backward=name in LEARNED)
            rows.append({"sweep": "tokens", **row})
            log(f"scaling {name} tokens={grid * grid}: {row.get('forward_ms')} ms {row['status']}")
            if row["status"] != "ok" or (row.get("forward_ms") or 0) > point_limit_s * 1e3:
                break
        g = 2 if quick else 32
        for r in ratios:
            row = measure(device, name, g * 14, g, 14, (g * r, g * r), runs)
            rows.append({"sweep": "ratio", "ratio": r, **row})
            if row["status"] != "ok":
                break
        side = 28 if quick else 448
        for c in channels:
            row = measure(device, name, side, side // 14, 14, (side, side), runs, channels=c)
            rows.append({"sweep": "channels", **row})
            if row["status"] != "ok":
                break
    return rows


def slope(points: Sequence[tuple]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and y > 0]
    if len(pts) < 3:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def figure(rows: List[Dict[str, Any]], path: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["upsampler"] for r in rows}):
        pts = [r for r in rows if r["upsampler"] == name and r["sweep"] == "tokens" and r["status"] == "ok"]
        if not pts:
            continue
        axes[0].plot([p["tokens"] for p in pts], [p["forward_ms"] for p in pts], marker="o", label=name)
        mem = [p for p in pts if p.get("forward_peak_mb") is not None]
        if mem:
            axes[1].plot([p["tokens"] for p in mem], [p["forward_peak_mb"] for p in mem], marker="o", label=name)
    for ax, ylabel in zip(axes, ("forward time (ms)", "peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input tokens (feature grid cells)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Upsampler scaling (output = image size, patch 14)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def summarise(forward: List[Dict[str, Any]], scale: List[Dict[str, Any]], cap_gb: float) -> Dict[str, Any]:
    def ms(name, size):
        for r in forward:
            if r["upsampler"] == name and r["size"] == size and r["status"] == "ok":
                return r["forward_ms"]
        return None

    big = SIZES[0][0]
    out: Dict[str, Any] = {}
    sizes = sorted({r["size"] for r in forward}, key=lambda s: int(s))
    first = sizes[0] if sizes else big
    up, bl = ms("uplift", first), ms("bilinear", first)
    out[f"uplift_over_bilinear_at_{first}"] = round(up / bl, 2) if up and bl else None
    tok = [r for r in scale if r["sweep"] == "tokens" and r["status"] == "ok"]
    at = {r["upsampler"]: r["forward_ms"] for r in tok if r["tokens"] == 1024}
    if "uplift" in at:
        out["uplift_faster_than_at_1024_tokens"] = {n: round(at[n] / at["uplift"], 2) for n in CROSS_ATTENTION
                                                    if n in at}
    up_pts = [r for r in tok if r["upsampler"] == "uplift"]
    out["uplift_time_slope_in_tokens"] = slope([(r["tokens"], r["forward_ms"]) for r in up_pts])
    out["uplift_memory_slope_in_tokens"] = slope([(r["tokens"], r["forward_peak_mb"]) for r in up_pts
                                                  if r.get("forward_peak_mb")])
    out[f"max_tokens_under_{cap_gb:g}GB"] = {n: max(r["tokens"] for r in tok if r["upsampler"] == n)
                                             for n in sorted({r["upsampler"] for r in tok})}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (dry run)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one golden case per method")
    ap.add_argument("--out", default=None, help="output folder (default gpu_check_out/<time>)")
    ap.add_argument("--golden", default=os.environ.get("UPBENCH_GOLDEN_DIR", str(ROOT.parent / "shared" / "golden")))
    ap.add_argument("--cap-gb", type=float, default=24.0, help="memory cap of the scaling sweep (GB)")
    ap.add_argument("--point-limit-s", type=float, default=5.0, help="stop a method's sweep after a point this slow")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: golden,launches,forward,scaling")
    ap.add_argument("--upsamplers", default="", help="comma-separated upsamplers (default: every feature upsampler)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.upsamplers:
        chosen = [n.strip() for n in args.upsamplers.split(",") if n.strip()]
        unknown = sorted(set(chosen) - set(FEATURE_UPSAMPLERS))
        if unknown:
            print(f"gpu_check: unknown upsampler(s) {', '.join(unknown)}; valid: {', '.join(FEATURE_UPSAMPLERS)}",
                  file=sys.stderr)
            return 2
        FEATURE_UPSAMPLERS[:] = chosen
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but torch {torch.__version__} sees no CUDA device; run with "
              "--device cpu for the dry run", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # parity: full fp32
    out = Path(args.out or ROOT / "gpu_check_out" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    summary: Dict[str, Any] = {"environment": environment(device), "quick": args.quick, "steps_s": {}, "errors": {}}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        if name in skip:
            summary["steps_s"][name] = "skipped"
            return None
        t0 = time.perf_counter()
        log(f"{name} ...")
        try:
            result = fn()
        except Exception as exc:  # one broken step must not hide the others' results
            summary["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log(f"{name} failed: {summary['errors'][name]}")
            result = None
        summary["steps_s"][name] = round(time.perf_counter() - t0, 1)
        if result is not None:
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return result

    gold = step("golden", lambda: golden(device, Path(args.golden), args.quick))
    if gold is not None:
        summary["golden"] = {"pass": sum(r["status"] == "pass" for r in gold),
                             "fail": [r["case"] for r in gold if r["status"] == "FAIL"],
                             "skipped": sum(r["status"] == "skipped" for r in gold),
                             "max_abs_err": max((r["max_abs_err"] for r in gold if r.get("max_abs_err") is not None),
                                                default=None)}
    counts = step("launches", lambda: launches(device))
    if counts is not None:
        summary["launches"] = {f"{r['upsampler']}@{r['size']}": [r["kernels"], r["syncs"], r["host_copies"]]
                               for r in counts}
    fwd = step("forward", lambda: forward_times(device, args.quick))
    scale = step("scaling", lambda: scaling(device, args.quick, args.cap_gb, args.point_limit_s))
    if scale is not None:
        summary["figure"] = figure(scale, out / "scaling.png")
    if fwd is not None and scale is not None:
        summary["figures"] = summarise(fwd, scale, args.cap_gb)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"summary: {out / 'summary.json'}")
    print(json.dumps(summary, indent=1))
    failed = bool(summary["errors"]) or bool(summary.get("golden", {}).get("fail"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
