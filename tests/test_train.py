"""upbench train: the multi-depth loss, resumable safetensors checkpoints, and resume-after-SIGKILL equality."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from upbench.data.train_images import TrainImages
from upbench.tasks.train import multi_depth_loss, pyramid_sizes
from upbench.errors import UpbenchError

TINY = ["backbone=demo", "data.root=builtin:skimage", "data.img_size=128", "data.crops_per_image=2",
        "data.limit=3", "train.batch_size=2", "train.depths=[1,2]", "train.save_every=1", "threads=1"]


def _train(tmp_path, out, *extra, wait=True):
    env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "upbench.cli", "train", *TINY, f"train.out_dir={out}", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out_text[-3000:]
        return out_text
    return proc


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _saved_step(state):
    from safetensors import safe_open

    try:
        with safe_open(str(state), framework="pt") as fh:
            return int(json.loads(fh.metadata()["step"]))
    except Exception:  # not written yet
        return 0


def test_pyramid_sizes_and_errors():
    assert pyramid_sizes(448, 14, 3) == [448, 224, 112, 56]
    with pytest.raises(UpbenchError, match="divisible"):
        pyramid_sizes(448, 16, 3)


def test_multi_depth_loss_compares_every_step_with_the_matching_level():
    class Doubler(torch.nn.Module):  # each step: nearest 2x of its input
        def forward_steps(self, image, features, iters):
            out, x = [], features
            for _ in range(iters):
                x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
                out.append(x)
            return out

    feats = [torch.full((1, 2, 8, 8), 3.0), torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 2, 2), 1.0)]
    images = [torch.zeros(1, 3, s, s) for s in (128, 64, 32)]
    total, per = multi_depth_loss(Doubler(), images, feats, [1, 2], "l2", lambda image: image)
    # d=1: step1 (2.0) vs level0 (3.0) -> 1; d=2: step1 (1.0) vs level1 (2.0) -> 1, step2 (1.0) vs level0 -> 4
    assert {d: float(v) for d, v in per.items()} == {1: 1.0, 2: 5.0} and float(total) == 6.0


def test_train_images_builtin_and_folder(tmp_path):
    ds = TrainImages("builtin:skimage", 64, crops_per_image=3, limit=2)
    assert len(ds) == 6 and ds[0].shape == (3, 64, 64) and 0 <= ds[0].min() and ds[0].max() <= 1
    assert not torch.equal(ds[0], ds[1])  # different crops of one photo
    with pytest.raises(UpbenchError, match="no images"):
        TrainImages(str(tmp_path), 64)


def test_training_resumes_after_sigkill_to_the_same_weights(tmp_path):
    steps = ["train.max_steps=6"]
    _train(tmp_path, tmp_path / "full", *steps)
    full = _weights(tmp_path / "full" / "uplift_demo.safetensors")

    out = tmp_path / "killed"
    proc = _train(tmp_path, out, *steps, wait=False)
    state = out / "train_state.safetensors"
    deadline = time.time() + 300
    while _saved_step(state) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    killed_at = _saved_step(state)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 2 <= killed_at < 6, "the run must be killed mid-way"
    assert not (out / "uplift_demo.safetensors").exists()
    log = _train(tmp_path, out, *steps)
    assert "resumed from step" in log
    assert not state.exists() and (out / "uplift_demo.log.json").exists()  # finished: state cleaned up, log kept
    resumed = _weights(out / "uplift_demo.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-5, rtol=1e-4), k
    # and the result is a trained model: it loads strictly as an official-format UPLiFT checkpoint
    from upbench import upsamplers

    model = upsamplers.create("uplift", in_channels=112, patch_size=16, weights=str(out / "uplift_demo.safetensors"))
    assert model.num_params > 0


def test_latent_noise_perturbs_inputs_only():
    class Identity(torch.nn.Module):  # one "step" returns its input features upsampled
        def forward_steps(self, image, features, iters):
            return [torch.nn.functional.interpolate(features, scale_factor=2, mode="nearest")]

    feats = [torch.ones(1, 4, 8, 8), torch.ones(1, 4, 4, 4)]
    images = [torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32)]
    clean, _ = multi_depth_loss(Identity(), images, feats, [1], "l2", lambda image: image)
    torch.manual_seed(0)
    noisy, _ = multi_depth_loss(Identity(), images, feats, [1], "l2", lambda image: image, input_noise=0.5)
    assert float(clean) == 0.0 and 0.1 < float(noisy) < 0.5  # E[(0.5 z)^2] = 0.25
    assert torch.equal(feats[0], torch.ones(1, 4, 8, 8))  # targets untouched


def test_uplift_vae_trains_on_taef2_latents(tmp_path):
    """`upbench train upsampler=uplift_vae backbone=taef2`: latent-space multi-depth loss; the weights load back."""
    from conftest import ASSETS, need

    need(ASSETS / "weights" / "taef2_encoder.pth")
    out = tmp_path / "vae"
    env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "upbench.cli", "train", "upsampler=uplift_vae", "backbone=taef2",
           "upsampler.kwargs.arch=uplift_vae_small", "data.root=builtin:skimage", "data.img_size=64", "data.limit=2",
           "train.depths=[1]", "train.batch_size=2", "train.max_steps=2", "train.latent_noise=0.1",
           f"train.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    weights = out / "uplift_vae_taef2.safetensors"
    from upbench import upsamplers

    model = upsamplers.create("uplift_vae", weights=str(weights), in_channels=32, patch_size=8,
                              arch="uplift_vae_small")
    assert model.num_params > 0
