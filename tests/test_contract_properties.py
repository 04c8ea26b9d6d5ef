"""The upsampler contract as a property, for every registered upsampler: for random batch (1-2), channels, feature
grid (1x1 and non-square included), image size and output size (smaller than the grid, non-square), the output is
exactly (B, C, H_out, W_out), finite, in the dtype of model and inputs.  Inputs a method cannot take by its
construction raise one clear UpbenchError instead.  Derandomised: the same examples on every run."""
from typing import Dict, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from upbench import upsamplers
from upbench.errors import UpbenchError

NAMES = upsamplers.available()
_MODELS: Dict[Tuple, torch.nn.Module] = {}


def unsupported(name: str, channels: int) -> Optional[str]:
    """What a method's constructor refuses (part of its error message), or None."""
    if name in ("lift", "lift_2x") and channels < 2:
        return "at least 2"
    if name == "loftup" and (channels + 20) % 4:
        return "multiple of num_heads"
    if name == "naf" and channels % 4:
        return "divisible by heads_attn"
    return None


def patch_sizes(name: str) -> Tuple[int, ...]:
    if name == "uplift_vae":
        return (8,)
    if name == "uplift":   # patch 8 selects the 53M-parameter VAE architecture, covered by uplift_vae
        return (14, 16)
    return (8, 14, 16)


def model(name: str, channels: int, patch: int, dtype: torch.dtype) -> torch.nn.Module:
    key = (name, channels, patch, dtype)
    if key not in _MODELS:
        torch.manual_seed(0)
        extra = {"arch": "uplift_vae_small"} if name == "uplift_vae" else {}   # the same class, narrow widths
        _MODELS[key] = upsamplers.create(name, in_channels=channels, patch_size=patch, **extra).to(dtype).eval()
    return _MODELS[key]


sides = st.integers(1, 6)
cases = st.fixed_dictionaries({
    "batch": st.integers(1, 2),
    "channels": st.integers(1, 12),
    "grid": st.tuples(sides, sides),
    "image": st.tuples(st.integers(1, 48), st.integers(1, 48)),
    "out": st.tuples(st.integers(1, 40), st.integers(1, 40)),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "patch_index": st.integers(0, 2),
})


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases)
@example(case={"batch": 1, "channels": 8, "grid": (1, 1), "image": (14, 14), "out": (1, 1),
               "dtype": torch.float32, "patch_index": 1})            # a single feature
@example(case={"batch": 2, "channels": 4, "grid": (1, 3), "image": (16, 40), "out": (9, 23),
               "dtype": torch.float32, "patch_index": 0})            # a one-row grid
@example(case={"batch": 2, "channels": 6, "grid": (5, 3), "image": (20, 12), "out": (2, 1),
               "dtype": torch.float64, "patch_index": 2})            # output smaller than the grid
def test_output_is_exactly_the_requested_size(name, case):
    patches = patch_sizes(name)
    patch = patches[case["patch_index"] % len(patches)]
    c, dtype = case["channels"], case["dtype"]
    refused = unsupported(name, c)
    if refused:
        with pytest.raises(UpbenchError, match=refused):
            model(name, c, patch, dtype)
        return
    gen = torch.Generator().manual_seed(0)
    b = case["batch"]
    image = torch.randn(b, 3, *case["image"], generator=gen, dtype=dtype)
    feats = torch.randn(b, c, *case["grid"], generator=gen, dtype=dtype)
    with torch.no_grad():
        y = model(name, c, patch, dtype)(image, feats, case["out"])
    assert tuple(y.shape) == (b, c, *case["out"])
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
