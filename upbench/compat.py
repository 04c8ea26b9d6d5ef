"""Guarded fallback for torchvision's compiled operators on a CPU-only torch.

The only torchvision wheel for torch 2.13 on PyPI is a CUDA build; on a CPU torch its ``_C`` extension fails to
load and ``import torchvision`` (and therefore ``import timm``) dies with "operator torchvision::nms does not
exist".  When -- and only when -- that extension cannot be loaded, we register ``torchvision::nms`` and
``torchvision::qnms`` with pure-PyTorch CPU kernels so that torchvision imports and ``ops.nms`` still works.
On a normal install (matching torch/torchvision) the real extension loads and nothing here is registered.

Importing this module installs the fallback (when needed); every plugin package (``upbench.backbones``,
``upbench.upsamplers``, ``upbench.tasks``, ``upbench.data``) imports it first, since those are where timm,
torchvision and diffusers get imported.  ``import upbench`` alone stays free of torch.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

import torch

_LIBRARY = None  # keeps the torch.library.Library alive; registrations vanish when it is garbage-collected
FALLBACK_ACTIVE = False


def _op_exists(qualified: str) -> bool:
    namespace, name = qualified.split("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _extension_path() -> Optional[str]:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    hits = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) +
                  glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.pyd")))
    return hits[0] if hits else None


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (boxes as x1, y1, x2, y2); returns kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    iou_cpu = iou.cpu()
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou_cpu[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def install_torchvision_fallback() -> bool:
    """Register CPU fallbacks for ``torchvision::nms``/``qnms`` if torchvision's extension cannot load.

    Must run before the first ``import torchvision`` (importing this module does it).  Returns True when the
    fallback is (now) active, False when it is not needed or torchvision is not installed.
    """
    global _LIBRARY, FALLBACK_ACTIVE
    if FALLBACK_ACTIVE:
        return True
    if _op_exists("torchvision::nms"):
        return False  # the real extension (or someone else) already provides it
    path = _extension_path()
    if path is None and importlib.util.find_spec("torchvision") is None:
        return False
    if path is not None:
        try:
            torch.ops.load_library(path)
        except (OSError, ImportError, RuntimeError):
            pass
        if _op_exists("torchvision::nms"):
            return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_reference, "CPU")
    lib.impl("qnms", lambda d, s, t: nms_reference(d.dequantize(), s.dequantize(), t), "QuantizedCPU")
    _LIBRARY = lib
    FALLBACK_ACTIVE = True
    return True


install_torchvision_fallback()
