"""Parity with the official implementations on every golden case in $UPBENCH_GOLDEN_DIR (default ../shared/golden).

Dispatch is on the case's ``method`` field only (never its file name): the runner is meant to be pointed at
further cases of the same kinds."""
import torch
import pytest

from upbench import upsamplers
from upbench.errors import UpbenchError
from upbench.upsamplers.base import kernel_path
from conftest import GOLDEN

#: every case directly in GOLDEN, and those of the NAF / JBF set in GOLDEN/naf (a GOLDEN that holds NAF cases
#: directly has them in the first glob)
CASES = sorted(GOLDEN.glob("*.pt")) + sorted((GOLDEN / "naf").glob("*.pt")) if GOLDEN.is_dir() else []


@pytest.mark.skipif(not CASES, reason=f"no golden cases found in {GOLDEN}")
@pytest.mark.parametrize("path", CASES, ids=[str(p.relative_to(GOLDEN).with_suffix("")) for p in CASES])
@pytest.mark.parametrize("kernels", ["auto", "device"])
def test_golden_case(path, kernels):
    """``kernels=device``: the accelerator path (fixed launch counts, no host work), forced on the CPU."""
    case = torch.load(path, weights_only=True)
    try:
        cls = upsamplers.for_official_method(case["method"])
    except UpbenchError:
        pytest.skip(f"method not implemented yet: {case['method']}")
    model = cls.from_official(case["method"], case["constructor"])
    model.load_official_state_dict(case["state_dict"], what=f"golden {path.name}", strict=True)
    model.eval()
    with torch.no_grad(), kernel_path(kernels):
        got = model.run_official(case["method"], case["inputs"], case["constructor"])
    assert set(case["expected"]) <= set(got), f"missing outputs {set(case['expected']) - set(got)}"
    for name, ref in case["expected"].items():
        out = got[name]
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        err = (out - ref).abs().max().item()
        print(f"golden {path.stem} [{kernels}] {name}: max abs err {err:.3e}")   # shown with pytest -s / -rA
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), f"{name}: max abs err {err:.3e}"
