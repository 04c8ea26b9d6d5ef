"""task=vos against the official code's outputs: every case file in the golden folder (``UPBENCH_VOS_GOLDEN_DIR``,
default ``../shared/golden/vos`` beside the checkout).  Metric cases: davis2017-evaluation's J / F (function level
with and without void, the semi-supervised per-frame arrays), per-object statistics and the global table, within
1e-6.  Propagation cases (LoftUp's or NAF's script): the one-hot first frame exactly, the soft labels within 1e-5,
the hard labels identical except at pixels the case flags as near ties.  The case's fields decide what is run."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from upbench.tasks import _vos_metrics as M
from upbench.tasks import _vos_propagation as P

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("UPBENCH_VOS_GOLDEN_DIR", ROOT.parent / "shared" / "golden" / "vos"))
CASES = sorted(GOLDEN.glob("*.pt")) if GOLDEN.is_dir() else []


def _metric_outputs(case):
    seqs = [{"name": s["name"], "gt": s["gt"].numpy(), "pred": s["pred"].numpy()} for s in case["inputs"]["sequences"]]
    bound_th = float(case.get("constructor", {}).get("bound_th", M.BOUND_TH))
    void_label = int(case.get("constructor", {}).get("void_label", M.VOID))
    mine = {}
    for s in seqs:
        gt = s["gt"]
        k = M.num_objects(gt[0])
        clean = np.where(gt == void_label, 0, gt)
        a, b, void = M.object_masks(clean, k), M.object_masks(s["pred"], k), gt == void_label
        for suffix, v in (("", None), ("_void", void)):
            mine[f"{s['name']}/J_all_frames{suffix}"] = np.stack([M.db_eval_iou(a[i], b[i], v) for i in range(k)])
            mine[f"{s['name']}/F_all_frames{suffix}"] = np.stack(
                [M.db_eval_boundary(a[i], b[i], v, bound_th) for i in range(k)])
    out = M.evaluate(seqs, bound_th)
    for name, (j, f) in out["per_sequence"].items():
        mine[f"{name}/J_scored_frames"], mine[f"{name}/F_scored_frames"] = j, f
    mine.update({f"per_object/{k}": v for k, v in out["per_object"].items()})
    mine.update({f"global/{k}": v for k, v in out["global"].items()})
    return mine, out["objects"]


def _geometry(case):
    """(label grid, up-sampled size) from the case's constructor (VOS.md 7.4)."""
    c = case["constructor"]
    h0, w0 = case["inputs"]["original_size_hw"]
    impl = str(c["implementation"]).lower()
    if impl == "loftup":
        size = c.get("imsize_hw", c.get("imsize"))
        ih, iw = (size, size) if isinstance(size, int) else size
        factor = int(c.get("label_factor", 2))
        grid = (ih // factor, iw // factor)
        return grid, (grid[0] * factor, grid[1] * factor)
    if impl == "naf":
        ps, ups = int(c["ps"]), int(c["ups_factor"])
        grid = (h0 // ps * ups, w0 // ps * ups)
        return grid, (grid[0] * ps // ups, grid[1] * ps // ups)
    raise AssertionError(f"unknown implementation {impl!r} in {case['case']}")


@pytest.mark.skipif(not CASES, reason=f"no golden VOS cases (*.pt) in {GOLDEN} (set UPBENCH_VOS_GOLDEN_DIR)")
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path):
    case = torch.load(path, weights_only=True)
    expected = case["expected"]
    if case["kind"] == "metric":
        mine, objects = _metric_outputs(case)
        assert objects == list(case["expected_object_names"])
        assert set(expected) <= set(mine), sorted(set(expected) - set(mine))
        for key, ref in expected.items():
            ref = np.asarray(ref.numpy() if torch.is_tensor(ref) else ref, dtype=np.float64)
            got = np.asarray(mine[key], dtype=np.float64)
            assert got.shape == ref.shape, key
            assert np.allclose(got, ref, atol=1e-6, rtol=0), (key, float(np.max(np.abs(got - ref))))
        return
    assert case["kind"] == "propagation", case["kind"]
    c = case["constructor"]
    grid, upsampled = _geometry(case)
    features = case["inputs"]["features"]
    assert tuple(features.shape[-2:]) == tuple(grid)
    out = P.propagate(features, case["inputs"]["first_frame_annotation"].numpy(), upsampled,
                      int(c["n_last_frames"]), int(c["size_mask_neighborhood"]), int(c["topk"]),
                      float(c["temperature"]), grid=grid)
    assert torch.equal(out["first_seg"], expected["first_seg"])
    assert out["soft_labels"].shape == expected["soft_labels"].shape
    err = float((out["soft_labels"] - expected["soft_labels"]).abs().max())
    assert torch.allclose(out["soft_labels"], expected["soft_labels"], atol=1e-5, rtol=0), err
    debug = case.get("debug") or {}
    for key, flags in (("labels_upsampled", "near_tie_upsampled"), ("labels", "near_tie_labels")):
        got = torch.as_tensor(out[key])
        assert got.shape == expected[key].shape, key
        differ = got != expected[key]
        if flags in debug:
            differ &= ~debug[flags].bool()
        assert int(differ.sum()) == 0, (key, int(differ.sum()))
