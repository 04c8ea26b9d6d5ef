"""Mixed precision (``compute_dtype=bf16|fp16``: every upsampler and the probe under ``torch.autocast``), the GPU
flags recorded in rows, and the CPU dry run of the one-shot GPU check."""
import json
import os
import subprocess
import sys

import pytest
import torch

from upbench import upsamplers
from upbench.cli import compose
from upbench.errors import UpbenchError
from upbench.runner import run_job
from conftest import GOLDEN, ROOT, randomise

#: max |out - out_fp32| / max |out_fp32| allowed under autocast, per method (stated in the README); measured on the
#: CPU with random weights at 56 px.  AnyUp's windowed softmax is the most sensitive to bfloat16 logits.
TOLERANCE = {
    "bf16": {"anyup": 0.25, "jafar": 0.06, "loftup": 0.06, "uplift": 0.02, "featup": 0.01, "lift": 0.06,
             "lift_2x": 0.03, "bilinear": 0.0, "nearest": 0.0, "lowres": 0.0, "input2x": 0.0,
             "naf": 0.02, "jbf": 0.0, "guided_filter": 0.0, "bicubic": 0.0},
    "fp16": {"anyup": 0.05, "jafar": 0.01, "loftup": 0.01, "uplift": 0.003, "featup": 0.002, "lift": 0.01,
             "lift_2x": 0.005, "bilinear": 0.0, "nearest": 0.0, "lowres": 0.0, "input2x": 0.0,
             "naf": 0.004, "jbf": 0.0, "guided_filter": 0.0, "bicubic": 0.0},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_every_upsampler_has_a_stated_tolerance():
    names = set(upsamplers.available()) - {"uplift_vae"}
    assert names <= set(TOLERANCE["bf16"]) and names <= set(TOLERANCE["fp16"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(TOLERANCE["bf16"]))
def test_autocast_runs_every_upsampler_within_its_tolerance(name, dtype):
    torch.manual_seed(0)
    model = upsamplers.create(name, in_channels=32, patch_size=14).eval()
    randomise(model)
    image, feats = torch.randn(1, 3, 56, 56), torch.randn(1, 32, 4, 4)
    with torch.inference_mode():
        ref = model(image, feats, (56, 56))
        with torch.autocast("cpu", dtype=DTYPES[dtype]):
            out = model(image, feats, (56, 56))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert err <= TOLERANCE[dtype][name], f"{name} under {dtype}: relative error {err:.3g}"


TINY = ["dataset=demo", "backbone=demo", "dataset.img_size=64", "dataset.num_images=4", "dataset.limit_val=2",
        "task.probe.epochs=2", "upsampler=lift_2x"]


def test_seg_runs_in_bfloat16_and_records_precision_and_gpu_flags(tmp_path, monkeypatch):
    import upbench.tasks.seg as seg

    seen = []   # (autocast on, dtype) where the upsampler runs; dtype of the probe's logits

    def spy_forward(self, image, features, output_size=None):
        seen.append(("upsampler", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, image, features, output_size)

    def spy_resize(pred, size):
        seen.append(("probe", pred.dtype))
        return resize(pred, size)

    cls, resize = upsamplers.get("lift_2x"), seg.resize_prediction
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", spy_forward)
    monkeypatch.setattr(seg, "resize_prediction", spy_resize)
    full = run_job(compose(TINY + [f"paths.results={tmp_path}"]), log=lambda *_: None)
    assert {e for e in seen if e[0] == "upsampler"} == {("upsampler", False, torch.get_autocast_dtype("cpu"))}
    assert {e for e in seen if e[0] == "probe"} == {("probe", torch.float32)}
    seen.clear()
    half = run_job(compose(TINY + [f"paths.results={tmp_path}", "compute_dtype=bf16"]), log=lambda *_: None)
    assert {e for e in seen if e[0] == "upsampler"} == {("upsampler", True, torch.bfloat16)}
    assert {e for e in seen if e[0] == "probe"} == {("probe", torch.bfloat16)}
    assert half["config"]["compute_dtype"] == "bf16" and full["config"]["compute_dtype"] is None
    assert half["config_hash"] != full["config_hash"]   # a different setup, never averaged with the float32 one
    for row in (full, half):
        assert row["device"]["tf32"] is False and row["device"]["cudnn_benchmark"] is False
    assert abs(half["metrics"]["miou"] - full["metrics"]["miou"]) < 15


def test_tf32_and_cudnn_benchmark_are_set_per_job_and_recorded(tmp_path):
    try:
        row = run_job(compose(TINY + [f"paths.results={tmp_path}", "tf32=true", "cudnn_benchmark=true"]),
                      log=lambda *_: None)
        assert row["device"]["tf32"] is True and row["device"]["cudnn_benchmark"] is True
        # the next job sets them again from its own config, whatever ran before in the process
        row = run_job(compose(TINY + [f"paths.results={tmp_path}", "seed=1"]), log=lambda *_: None)
        assert row["device"]["tf32"] is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("override,needle", [("compute_dtype=int8", "compute_dtype=int8: expected one of"),
                                             ("tf32=maybe", "tf32=maybe: expected true or false")])
def test_bad_precision_settings_are_refused(tmp_path, override, needle):
    with pytest.raises(UpbenchError, match=needle):
        run_job(compose(TINY + [f"paths.results={tmp_path}", override]), log=lambda *_: None)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """``benchmarks/gpu_check.sh --device cpu --quick``: every step runs and the summary has every section."""
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(out), "--upsamplers", "bilinear,uplift,jafar"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["errors"], summary["errors"]
    assert summary["golden"]["fail"] == []
    if GOLDEN.is_dir():
        assert summary["golden"]["pass"] >= 1
    assert summary["launches"]["uplift@448"] == summary["launches"]["uplift@448"][:1] + [0, 0]
    assert summary["launches"]["uplift@448"][0] <= 200
    for name in ("golden", "launches", "forward", "scaling"):
        assert (out / f"{name}.json").is_file() and isinstance(summary["steps_s"][name], float)
    assert (out / "scaling.png").stat().st_size > 10_000
    forward = json.loads((out / "forward.json").read_text())
    assert {r["upsampler"] for r in forward} >= {"uplift", "jafar", "bilinear"}
    assert all(r["status"] == "ok" and r["forward_ms"] > 0 for r in forward)
    scaling = json.loads((out / "scaling.json").read_text())
    assert {r["sweep"] for r in scaling} == {"tokens", "ratio", "channels"}
    assert any(r.get("train_step_ms") for r in scaling if r["upsampler"] == "uplift")
