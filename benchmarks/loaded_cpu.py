"""How upsamplers degrade on a shared CPU: forward time at 448 px (DINOv2-S/14 shapes) quiet and under a background
load of busy processes (``stress --cpu N`` style), per thread count and OpenMP wait policy.

    python benchmarks/loaded_cpu.py --load 8 --upsamplers uplift,bilinear --threads 1,2 --policies ACTIVE,PASSIVE

Every setting runs in a fresh process (OpenMP reads its environment once), quiet first, then with the load running;
each table row gives the median of ``--runs`` forwards and the slowdown (loaded / quiet) as soon as it is measured.  A benchmark, not a test: its
numbers depend on the machine."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time


def _busy() -> None:
    while True:
        pass


def measure(name: str, threads: int, runs: int, size: int = 448, grid: int = 32, channels: int = 384) -> dict:
    import torch

    from upbench import upsamplers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = upsamplers.create(name, in_channels=channels, patch_size=size // grid).eval()
    image, feats = torch.randn(1, 3, size, size), torch.randn(1, channels, grid, grid)
    times = []
    with torch.inference_mode():
        model(image, feats, (size, size))
        for _ in range(runs):
            t0 = time.perf_counter()
            model(image, feats, (size, size))
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "runs": runs}


def run_setting(name: str, threads: int, policy: str, runs: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps([name, threads, runs])], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=8, help="busy background processes")
    ap.add_argument("--upsamplers", default="uplift,bilinear")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="default,PASSIVE", help="OMP_WAIT_POLICY values (default: unset)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, threads, runs = json.loads(args.worker)
        print(json.dumps(measure(name, threads, runs)))
        return
    settings = [(n, int(t), p) for n in args.upsamplers.split(",") for t in args.threads.split(",")
                for p in args.policies.split(",")]
    print(f"background load: {args.load} busy processes, {os.cpu_count()} CPUs; median of {args.runs} forwards")
    print("| upsampler | threads | OMP_WAIT_POLICY | quiet ms | loaded ms | slowdown |")
    print("|---|---|---|---|---|---|", flush=True)
    for s in settings:
        q = run_setting(*s, args.runs)["median_ms"]
        procs = [mp.Process(target=_busy, daemon=True) for _ in range(args.load)]
        for p in procs:
            p.start()
        try:
            time.sleep(1)
            lo = run_setting(*s, args.runs)["median_ms"]
        finally:
            for p in procs:
                p.terminate()
        print(f"| {s[0]} | {s[1]} | {s[2]} | {q:.1f} | {lo:.1f} | {lo / q:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
