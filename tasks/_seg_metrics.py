"""Segmentation scores from one confusion matrix: mIoU, per-class IoU and pixel accuracy, with torchmetrics'
definitions (``MulticlassJaccardIndex`` macro / none, ``MulticlassAccuracy`` micro, ``ignore_index`` as it treats
it; equal on the same inputs, tested).  Importing torchmetrics costs seconds in every job (it loads its text and
audio metrics, scipy.signal and transformers), so the seg tasks count pixels here."""
from __future__ import annotations

from typing import Optional

import torch


class ConfusionMatrix:
    """Pixel counts ``(target class, predicted class)`` over the labelled pixels (target != ``ignore_index``)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None, device=None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.flatten().long(), target.flatten().long()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        bins = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes ** 2)
        self.counts += bins[: self.num_classes ** 2].reshape(self.num_classes, self.num_classes)

    def support(self) -> torch.Tensor:
        """Labelled pixels per class (the matrix's rows)."""
        return self.counts.sum(1)

    def _in_range_ignore(self) -> bool:
        return self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1]; 0 for a class neither labelled nor predicted (torchmetrics' zero_division)."""
        cm = self.counts.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.zeros_like(tp))

    def miou(self) -> float:
        """Mean IoU in [0, 1] over the classes present in the labels or the predictions (and not ignored)."""
        cm = self.counts
        present = (cm.sum(0) + cm.sum(1)) > 0
        if self._in_range_ignore():
            present[self.ignore_index] = False
        if not bool(present.any()):
            return 0.0
        return float(self.iou()[present].mean())

    def accuracy(self) -> float:
        """Pixel accuracy in [0, 1] over the labelled pixels."""
        total = int(self.counts.sum())
        return float(self.counts.diag().sum()) / total if total else 0.0
