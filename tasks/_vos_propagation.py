"""Semi-supervised label propagation by feature affinity (DINO / UVC, as LiFT, LoftUp and NAF run it on DAVIS).

The first frame's labels (one-hot on the label grid) and the soft labels of the last ``n_last_frames`` frames are the
context; each target pixel takes the labels of its ``topk`` most similar context pixels (jointly over all contexts),
weighted by exp(cosine / temperature) and restricted to a square window of ``radius`` grid cells.  The soft map of a
frame goes into the queue; only the saved label maps are hard.

The affinity is computed tile by tile over the target grid: outside the window it is exactly zero, so a tile only
needs the sources within ``radius`` of it.  Per target pixel the result is the one of the dense (n*P, P) matrix."""
from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

Size = Tuple[int, int]

#: the cost of one tile in affinity entries (its kernel launches / Python work), per device type: the tile side is
#: chosen to minimise entries computed + tiles x this; small tiles waste less on sources outside the window
TILE_OVERHEAD = {"cpu": 3e4}
TILE_OVERHEAD_DEFAULT = 5e6


def pil_nearest(labels: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """PIL's NEAREST resize of a uint8 label map to (h, w): its half-pixel rule, accumulated in doubles, decides exact
    ties in a way a closed formula does not, so PIL itself does it (as the official code)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    arr = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8))
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.NEAREST))


def first_frame_labels(annotation: np.ndarray, grid: Sequence[int]) -> torch.Tensor:
    """One-hot (1, K+1, h, w) float32 of the first annotation PIL-nearest-resized to the label grid, K = the largest
    id left after the resize."""
    small = torch.from_numpy(pil_nearest(annotation, grid).astype(np.int64))
    k1 = int(small.max()) + 1
    return F.one_hot(small, k1).permute(2, 0, 1)[None].to(torch.float32).contiguous()


def _window(rows: range, cols: range, src_rows: range, src_cols: range, radius: int) -> torch.Tensor:
    """(T, S) bool: target (r, c) sees source (r', c') when |r - r'| <= radius and |c - c'| <= radius."""
    tr, tc = torch.arange(rows.start, rows.stop), torch.arange(cols.start, cols.stop)
    sr, sc = torch.arange(src_rows.start, src_rows.stop), torch.arange(src_cols.start, src_cols.stop)
    row_ok = (tr[:, None] - sr[None, :]).abs() <= radius                  # (th, sh)
    col_ok = (tc[:, None] - sc[None, :]).abs() <= radius                  # (tw, sw)
    ok = row_ok[:, None, :, None] & col_ok[None, :, None, :]             # (th, tw, sh, sw)
    return ok.reshape(len(rows) * len(cols), len(src_rows) * len(src_cols))


class LabelPropagation:
    """Propagates the first frame's labels through a video, one frame at a time.

    ``first_features``: (C, h, w) at the label grid; ``first_labels``: (1, K+1, h, w).  :meth:`step` takes the next
    frame's (C, h, w) features and returns its soft labels (1, K+1, h, w)."""

    def __init__(self, first_features: torch.Tensor, first_labels: torch.Tensor, n_last_frames: int = 7,
                 radius: int = 12, topk: int = 5, temperature: float = 0.1, tile: Optional[int] = None):
        if first_features.dim() != 3 or first_labels.dim() != 4:
            raise ValueError("first_features must be (C, h, w) and first_labels (1, K+1, h, w)")
        if tuple(first_features.shape[-2:]) != tuple(first_labels.shape[-2:]):
            raise ValueError(f"features {tuple(first_features.shape[-2:])} and labels "
                             f"{tuple(first_labels.shape[-2:])} must share the label grid")
        if int(topk) < 1 or float(temperature) <= 0 or int(n_last_frames) < 0:
            raise ValueError("topk must be >= 1, temperature > 0 and n_last_frames >= 0")
        self.grid: Size = (int(first_features.shape[-2]), int(first_features.shape[-1]))
        self.n_last_frames, self.radius, self.topk = int(n_last_frames), int(radius), int(topk)
        self.temperature = float(temperature)
        self.device = first_features.device
        # contexts are kept normalised (the official code normalises them again at every step: the same numbers)
        self.first = (self._normalise(first_features), first_labels[0].to(self.device, torch.float32))
        self.queue: Deque[Tuple[torch.Tensor, torch.Tensor]] = deque()
        self.tiles = self._tiles(max(1, int(tile or self._tile_side())))

    def _tile_side(self) -> int:
        """The tile side with the least estimated work (speed only: results are per target pixel)."""
        h, w = self.grid
        if self.radius <= 0:
            return max(h, w)
        overhead = TILE_OVERHEAD.get(self.device.type, TILE_OVERHEAD_DEFAULT)

        def cost(t: int) -> float:
            total = 0.0
            for r0 in range(0, h, t):
                for c0 in range(0, w, t):
                    th, tw = min(h, r0 + t) - r0, min(w, c0 + t) - c0
                    sh = min(h, r0 + th + self.radius) - max(0, r0 - self.radius)
                    sw = min(w, c0 + tw + self.radius) - max(0, c0 - self.radius)
                    total += th * tw * sh * sw + overhead
            return total

        sides = sorted({4, 8, 16, 32, 64, max(h, w)})
        return min(sides, key=cost)

    def _tiles(self, tile: int) -> List[Tuple[slice, slice, slice, slice, Optional[torch.Tensor]]]:
        """(target rows, target cols, source rows, source cols, window (T, S) or None), built once per video."""
        h, w = self.grid
        if self.radius <= 0:   # no window: every source, targets in bands of rows
            band = max(1, min(h, 1024 // max(1, w)))
            return [(slice(r0, min(h, r0 + band)), slice(0, w), slice(0, h), slice(0, w), None)
                    for r0 in range(0, h, band)]
        out = []
        for r0 in range(0, h, tile):
            for c0 in range(0, w, tile):
                rows, cols = range(r0, min(h, r0 + tile)), range(c0, min(w, c0 + tile))
                src_rows = range(max(0, r0 - self.radius), min(h, rows.stop + self.radius))
                src_cols = range(max(0, c0 - self.radius), min(w, cols.stop + self.radius))
                window = _window(rows, cols, src_rows, src_cols, self.radius)
                out.append((slice(rows.start, rows.stop), slice(cols.start, cols.stop),
                            slice(src_rows.start, src_rows.stop), slice(src_cols.start, src_cols.stop),
                            None if bool(window.all()) else window.to(self.device)))
        return out

    @staticmethod
    def _normalise(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.to(torch.float32), p=2, dim=0, eps=1e-12)

    def step(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) != self.grid:
            raise ValueError(f"features of a frame are {tuple(features.shape[-2:])}, the label grid is {self.grid}")
        target = self._normalise(features.to(self.device))
        contexts = [self.first] + list(self.queue)
        seg = self._transfer(target, contexts)[None]
        if len(self.queue) >= self.n_last_frames:
            self.queue.popleft()
        if self.n_last_frames > 0:
            self.queue.append((target, seg[0]))
        return seg

    def _transfer(self, target: torch.Tensor, contexts: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        c = target.shape[0]
        k1 = contexts[0][1].shape[0]
        n = len(contexts)
        out = target.new_zeros(k1, *self.grid)
        feats = torch.stack([f for f, _ in contexts], dim=1)       # (C, n, h, w)
        labels = torch.stack([lab for _, lab in contexts], dim=1)  # (K+1, n, h, w)
        for rows, cols, src_rows, src_cols, window in self.tiles:
            tgt = target[:, rows, cols].reshape(c, -1).t()                              # (T, C)
            src = feats[:, :, src_rows, src_cols].reshape(c, -1)                        # (C, n*S), context-major
            lab = labels[:, :, src_rows, src_cols].reshape(k1, -1).t()                  # (n*S, K+1)
            dots = tgt @ src                                                            # (T, n*S)
            if window is not None:   # outside the window the affinity is 0: below every exp(.)
                dots.view(dots.shape[0], n, -1).masked_fill_(~window[:, None, :], float("-inf"))
            out[:, rows, cols] = self._weighted(dots, lab).t().reshape(k1, rows.stop - rows.start,
                                                                       cols.stop - cols.start)
        return out

    def _weighted(self, dots: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """(T, K+1) from the dot products ``dots`` (T, N) (-inf outside the window) and the labels ``lab`` (N, K+1):
        A = exp(dots / temperature); per row keep the entries >= its k-th largest (ties included), divide by their
        sum, weight the labels.

        exp and the division are monotone, so the k-th largest A is exp(k-th largest dot / temperature): only the
        k + 1 largest dots need the exponential.  A row whose (k+1)-th value equals its k-th after exp has a tie
        that keeps more than k entries; such rows are done on the whole row."""
        t_count, n_src = dots.shape
        if n_src <= self.topk:
            # fewer candidates than k: in the dense (n*P)-long column the sources outside the window are 0, so the
            # k-th largest is 0 and nothing is cut
            aff = torch.exp(dots / self.temperature)
            return (aff / aff.sum(dim=1, keepdim=True)) @ lab
        top = torch.topk(dots, self.topk + 1, dim=1)
        values = torch.exp(top.values / self.temperature)
        thr = values[:, self.topk - 1]
        tied = values[:, self.topk] == thr
        kept, idx = values[:, :self.topk], top.indices[:, :self.topk]
        weights = kept / kept.sum(dim=1, keepdim=True)
        result = torch.einsum("tk,tkc->tc", weights, lab[idx])
        if bool(tied.any()):
            aff = torch.exp(dots[tied] / self.temperature)
            aff = torch.where(aff < thr[tied, None], torch.zeros_like(aff), aff)
            result[tied] = (aff / aff.sum(dim=1, keepdim=True)) @ lab
        return result


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per channel of (K+1, H, W): when its maximum is > 0, shift its minimum to 0 and scale its new maximum to 1
    (each object is stretched to [0, 1] before the arg-max); other channels are left as they are."""
    out = mask.clone()
    for k in range(out.shape[0]):
        ch = out[k]
        if ch.max() > 0:
            ch = ch - ch.min()
            out[k] = ch / ch.max()
    return out


def hard_labels(seg: torch.Tensor, upsampled_size: Sequence[int],
                original_size: Sequence[int]) -> Tuple[torch.Tensor, np.ndarray]:
    """(arg-max at ``upsampled_size`` (Hu, Wu) uint8, the label map at the original (H0, W0) size) of soft labels
    (1, K+1, h, w): bilinear up-sampling, per-channel min-max, arg-max (lowest channel on ties), PIL nearest."""
    up = F.interpolate(seg.to(torch.float32), size=(int(upsampled_size[0]), int(upsampled_size[1])),
                       mode="bilinear", align_corners=False)[0]
    labels = torch.max(norm_mask(up), dim=0).indices.to(torch.uint8)
    return labels, pil_nearest(labels.cpu().numpy(), original_size)


def propagate(features: Sequence[torch.Tensor], first_annotation: np.ndarray, upsampled_size: Sequence[int],
              n_last_frames: int = 7, radius: int = 12, topk: int = 5, temperature: float = 0.1,
              grid: Optional[Sequence[int]] = None) -> dict:
    """A whole video at once (tests, small clips): ``features`` (T, C, h, w) at the label grid, the first annotation
    (H0, W0).  Returns ``first_seg``, ``soft_labels`` (T-1, K+1, h, w), ``labels_upsampled`` (T-1, Hu, Wu) and
    ``labels`` (T, H0, W0), frame 0 = the annotation."""
    grid = tuple(grid or features[0].shape[-2:])
    first_seg = first_frame_labels(first_annotation, grid)
    prop = LabelPropagation(features[0], first_seg, n_last_frames, radius, topk, temperature)
    soft, ups, labels = [], [], [np.asarray(first_annotation, dtype=np.uint8)]
    for t in range(1, len(features)):
        seg = prop.step(features[t])
        up, lab = hard_labels(seg, upsampled_size, first_annotation.shape[-2:])
        soft.append(seg[0])
        ups.append(up)
        labels.append(lab)
    k1 = first_seg.shape[1]
    return {"first_seg": first_seg,
            "soft_labels": torch.stack(soft) if soft else torch.zeros(0, k1, *grid),
            "labels_upsampled": torch.stack(ups) if ups else torch.zeros(0, *upsampled_size, dtype=torch.uint8),
            "labels": np.stack(labels)}
