"""The torchvision operator fallback: active only when torchvision's own extension cannot load."""
import subprocess
import sys
import textwrap

import torch

from upbench import compat


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_reference_nms_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], 1)
    scores = torch.rand(60, generator=g)
    keep = compat.nms_reference(boxes, scores, 0.4)

    def iou(a, b):
        lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
        inter = (rb - lt).clamp(min=0).prod()
        return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)

    expected = []
    for i in torch.argsort(scores, descending=True).tolist():
        if all(iou(boxes[i], boxes[j]) <= 0.4 for j in expected):
            expected.append(i)
    assert keep.tolist() == expected


def test_fallback_state_matches_whether_the_real_extension_loads():
    real_loads = _run("""
        import torch, upbench.compat as c
        p = c._extension_path()
        try:
            torch.ops.load_library(p); torch.ops.torchvision.nms; print(1)
        except Exception:
            print(0)
    """) == "1"
    state = _run("""
        import upbench, torch, timm, torchvision
        from upbench import compat
        b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.]])
        keep = torch.ops.torchvision.nms(b, torch.tensor([.9, .8, .7]), 0.5).tolist()
        print(int(compat.FALLBACK_ACTIVE), keep)
    """)
    assert state == f"{int(not real_loads)} [0, 2]"


def test_fallback_stays_inactive_when_the_ops_exist():
    # Simulate a working torchvision extension: the operator is already registered before upbench is imported.
    out = _run("""
        import torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", lambda d, s, t: torch.tensor([42]), "CPU")
        import upbench
        from upbench import compat
        print(int(compat.FALLBACK_ACTIVE), int(compat.install_torchvision_fallback()),
              torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5).tolist())
    """)
    assert out == "0 0 [42]"
