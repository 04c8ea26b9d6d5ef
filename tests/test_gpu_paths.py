"""The accelerator path of every upsampler: a fixed number of kernel launches, no host-device syncs, no host-to-device
copies, and the same numbers as the CPU path.

Launches are counted with a dispatch-mode counter on the ``meta`` device (no GPU needed, nothing computed): any read
of a tensor's values there is a sync on a real device.  Shapes as in the GPU audit: DINOv2-S/14 at 448 px
(features 1x384x32x32 -> 448^2) and patch 16 at 1024 px (64x64 -> 1024^2)."""
import pytest
import torch

from upbench import upsamplers
from upbench.launches import LaunchCounter, count_launches, forward_launches
from upbench.upsamplers import base
from upbench.upsamplers.base import kernel_path

#: kernels per forward allowed on the accelerator path at 448 px (and at 1024 px: the count must not grow)
KERNEL_TARGETS = {
    "bilinear": 1, "nearest": 1, "lowres": 1, "input2x": 1,
    "lift_2x": 25, "lift": 100,
    "jafar": 110, "anyup": 150, "loftup": 95,
    # FeatUp's JBU loops over its 7x7 spatial taps (~730 launches, constant in size): ~5 ms of launches against
    # ~40 ms of compute at 448 px, so not launch-bound; the bound keeps it from growing
    "featup": 800,
    # UPLiFT: <= 200 at any size; the SD-VAE variant is a larger network (LayerNorm blocks, a refiner, 3 steps)
    "uplift": 200, "uplift_vae": 420,
    # NAF: the encoder (~40) and a grouped neighbourhood attention of fixed size (measured 64 at 448 and 1024);
    # JBF / guided filter: fixed filter pipelines (measured 25 / 76); bicubic: one interpolation
    "naf": 80, "jbf": 35, "guided_filter": 90, "bicubic": 1,
}
SHAPES = {"448": ((1, 3, 448, 448), (32, 32), 14, (448, 448)), "1024": ((1, 3, 1024, 1024), (64, 64), 16, (1024, 1024))}


def _channels(name):
    return 4 if name == "uplift_vae" else 384


def _counts(name, size, patch=None):
    image, grid, p, out = SHAPES[size]
    c = _channels(name)
    if name == "uplift_vae":  # VAE latents: stride 8
        grid, p = (image[2] // 8, image[3] // 8), 8
    torch.manual_seed(0)
    model = upsamplers.create(name, in_channels=c, patch_size=patch or p)
    with kernel_path("device"):
        return forward_launches(model, image, (1, c) + tuple(grid), out, device="meta")


def test_every_upsampler_has_a_target():
    assert set(upsamplers.available()) <= set(KERNEL_TARGETS), \
        f"add a launch target for {sorted(set(upsamplers.available()) - set(KERNEL_TARGETS))}"


@pytest.mark.parametrize("name", sorted(KERNEL_TARGETS))
def test_launches_syncs_and_host_copies(name):
    small, large = _counts(name, "448"), _counts(name, "1024")
    for size, got in (("448", small), ("1024", large)):
        assert got.syncs == 0, f"{name} @{size}: {got.syncs} host-device syncs per forward"
        assert got.host_copies == 0, f"{name} @{size}: {got.host_copies} host-to-device copies per forward"
        assert got.kernels <= KERNEL_TARGETS[name], \
            f"{name} @{size}: {got.kernels} kernels > target {KERNEL_TARGETS[name]} ({got.as_dict()['top_ops']})"
    assert large.kernels <= small.kernels + 2, f"{name}: launches grow with size ({small.kernels} -> {large.kernels})"


@pytest.mark.parametrize("name", ["jafar", "anyup", "loftup", "naf"])
def test_query_chunks_follow_free_memory(monkeypatch, name):
    """With the free memory of an 80 GB card, 1024 px needs at most a few chunks, not hundreds."""
    monkeypatch.setitem(base.ASSUMED_FREE_BYTES, "meta", 80 * 2 ** 30)
    large = _counts(name, "1024")
    monkeypatch.setitem(base.ASSUMED_FREE_BYTES, "meta", None)
    assert large.kernels <= 3 * _counts(name, "1024").kernels


def test_counter_sees_syncs_and_host_tensors():
    x = torch.zeros(4, 4, device="meta")
    assert count_launches(lambda: x.sum().item()).syncs == 1
    assert count_launches(lambda: x[x > 0]).syncs >= 1
    assert count_launches(lambda: x + torch.arange(4).float()).host_copies >= 1
    got = count_launches(lambda: (x * 2).t().contiguous().view(-1))
    assert (got.kernels, got.syncs, got.host_copies) == (2, 0, 0)


def _random_model(name, c, patch):
    torch.manual_seed(1)
    model = upsamplers.create(name, in_channels=c, patch_size=patch).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", sorted(n for n in KERNEL_TARGETS if n != "uplift_vae"))
@pytest.mark.parametrize("grid,out", [((6, 5), (43, 34)), ((1, 1), (9, 9)), ((4, 4), (56, 56))],
                         ids=["6x5->43x34", "1x1->9x9", "4x4->56x56"])
def test_device_path_equals_cpu_path(name, grid, out):
    model = _random_model(name, 24, 14)
    image = torch.randn(2, 3, grid[0] * 14, grid[1] * 14)
    feats = torch.randn(2, 24)[..., None, None] + torch.randn(2, 24, *grid)
    with torch.inference_mode():
        ref = model(image, feats, out)
        with kernel_path("device"):
            got = model(image, feats, out)
    assert got.shape == ref.shape == (2, 24) + out
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_uplift_batchnorm_folded_once_and_refolded_after_loading():
    model = _random_model("uplift", 32, 14)
    image, feats = torch.randn(1, 3, 112, 112), torch.randn(1, 32, 8, 8)
    with torch.inference_mode():
        model(image, feats, (32, 32))
    counter = LaunchCounter("cpu")
    with torch.inference_mode(), counter:
        model(image, feats, (32, 32))
    assert counter.count.ops["rsqrt"] == 0, "BatchNorm is folded again in every forward"
    state = model.state_dict()
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key] * 3.0
    model.load_state_dict(state)
    with torch.no_grad():
        fast = model(image, feats, (32, 32))
        model.fast = False
        reference = model(image, feats, (32, 32))
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_unknown_kernel_is_refused():
    with pytest.raises(Exception, match="valid: auto, rows, vectorised, compile"):
        upsamplers.create("uplift", kernel="cuda-magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.compile attender and device parity)")
@pytest.mark.parametrize("kernel", ["vectorised", "compile"])
def test_uplift_kernels_on_cuda(kernel):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = _random_model("uplift", 384, 14)
    model = upsamplers.create("uplift", in_channels=384, patch_size=14, kernel=kernel).eval()
    model.load_state_dict(ref.state_dict())
    image, feats = torch.randn(1, 3, 224, 224), torch.randn(1, 384, 16, 16)
    with torch.inference_mode():
        expected = ref(image, feats, (224, 224))
        got = model.cuda()(image.cuda(), feats.cuda(), (224, 224)).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
