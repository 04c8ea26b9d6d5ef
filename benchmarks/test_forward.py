"""Forward time of every registered feature upsampler at DINOv2-S/14 448 px shapes (not part of the default run).

    python -m pytest -n 0 benchmarks/ --benchmark-columns=median,iqr,rounds
    UPBENCH_BENCH_ROUNDS=10 python -m pytest -n 0 benchmarks/ -k uplift

Image (1, 3, 448, 448), features (1, 384, 32, 32), output (448, 448), random weights (timing does not depend on
them), inference mode, the thread count recorded in ``extra_info``. Compare methods only within one run."""
import os

import pytest
import torch

from upbench import upsamplers

ROUNDS = int(os.environ.get("UPBENCH_BENCH_ROUNDS", "3"))
FEATURE_UPSAMPLERS = [n for n in upsamplers.available() if n != "uplift_vae"]
#: opt-in variants timed beside the defaults: (id, upsampler, constructor kwargs)
VARIANTS = [("uplift-bf16", "uplift", {"compute_dtype": "bfloat16"})]
CASES = [(n, n, {}) for n in FEATURE_UPSAMPLERS] + VARIANTS


@pytest.mark.parametrize("case,name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_forward_448_dinov2s(benchmark, case, name, kwargs):
    torch.manual_seed(0)
    model = upsamplers.create(name, in_channels=384, patch_size=14, **kwargs).eval()
    image, feats = torch.randn(1, 3, 448, 448), torch.randn(1, 384, 32, 32)

    def forward():
        with torch.inference_mode():
            return model(image, feats, (448, 448))

    benchmark.extra_info.update(threads=torch.get_num_threads(), params=model.num_params)
    out = benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert out.shape == (1, 384, 448, 448)
