"""DAVIS-2017 semi-supervised scores as the official davis2017-evaluation code defines them: J (region similarity),
F (boundary F-measure with its one-sided, border-free boundary maps and a disk tolerance of 0.008 x the frame
diagonal), the per-object statistics (mean, recall, decay) and the global table (a flat mean over objects).

Everything is float64 numpy on label maps of object ids (0 = background, 255 = void in the ground truth)."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from upbench.errors import UpbenchError

VOID = 255
BOUND_TH = 0.008


# ------------------------------------------------------------------------------------------------ J
def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray,
                void_pixels: Optional[np.ndarray] = None) -> Any:
    """J of binary masks (H, W) or stacks (T, H, W): |s & a & ~v| / |(s | a) & ~v|, 1 where the union is empty."""
    a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
    keep = np.ones_like(a) if void_pixels is None else ~np.asarray(void_pixels, bool)
    inter = np.sum((a & s) & keep, axis=(-2, -1))
    union = np.sum((a | s) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j[union == 0] = 1.0   # both masks empty: a perfect (empty) segmentation
    return j


# ------------------------------------------------------------------------------------------------ F
def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """The official boundary map: a pixel differing from its east, south or south-east neighbour (0 beyond the
    image); the last row compares east only, the last column south only, the bottom-right pixel is never boundary,
    so the image border itself makes no boundary."""
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"seg2bmap takes one (H, W) mask, got shape {m.shape}")
    e = np.zeros_like(m)
    s = np.zeros_like(m)
    se = np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def bound_pix(shape: Sequence[int], bound_th: float = BOUND_TH) -> float:
    """The tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th x the frame's diagonal) -- with
    numpy's norm, as the official code, so products that land next to an integer round the same way."""
    if bound_th >= 1:
        return float(bound_th)
    return float(np.ceil(bound_th * np.linalg.norm(np.asarray(shape[-2:], dtype=np.float64))))


def disk(radius: float) -> np.ndarray:
    """Every integer offset with dy^2 + dx^2 <= radius^2 (skimage's ``disk``)."""
    r = np.arange(-math.floor(radius), math.floor(radius) + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


def _dilate(bmap: np.ndarray, radius: float) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    if radius <= 0 or not bmap.any():
        return bmap.copy()
    return binary_dilation(bmap, structure=disk(radius), border_value=0)


def f_measure(foreground: np.ndarray, gt: np.ndarray, void_pixels: Optional[np.ndarray] = None,
              bound_th: float = BOUND_TH) -> float:
    """F of one frame: ``foreground`` is the prediction (precision is measured on its boundary), ``gt`` the
    annotation; void pixels are cleared in both masks before their boundaries are taken."""
    fg, gt = np.asarray(foreground, bool), np.asarray(gt, bool)
    if void_pixels is not None:
        keep = ~np.asarray(void_pixels, bool)
        fg, gt = fg & keep, gt & keep
    radius = bound_pix(fg.shape, bound_th)
    fg_b, gt_b = seg2bmap(fg), seg2bmap(gt)
    # matches are only looked up at boundary pixels, so the dilations can be cropped to the boundaries' bounding box
    # plus the tolerance (exact: nothing outside it is within reach of a boundary pixel)
    rows, cols = np.nonzero(fg_b | gt_b)
    if rows.size:
        pad = int(math.ceil(radius))
        y0, y1 = max(0, rows.min() - pad), rows.max() + pad + 1
        x0, x1 = max(0, cols.min() - pad), cols.max() + pad + 1
        fg_b, gt_b = fg_b[y0:y1, x0:x1], gt_b[y0:y1, x0:x1]
    fg_match = np.sum(fg_b & _dilate(gt_b, radius))
    gt_match = np.sum(gt_b & _dilate(fg_b, radius))
    n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision, recall = fg_match / float(n_fg), gt_match / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: Optional[np.ndarray] = None,
                     bound_th: float = BOUND_TH) -> Any:
    """F of binary masks (H, W) or, frame by frame, of stacks (T, H, W)."""
    a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
    if a.shape != s.shape:
        raise ValueError(f"annotation {a.shape} and segmentation {s.shape} differ in shape")
    if a.ndim == 2:
        return f_measure(s, a, void_pixels, bound_th)
    voids = [None] * a.shape[0] if void_pixels is None else list(np.asarray(void_pixels, bool))
    return np.array([f_measure(s[t], a[t], voids[t], bound_th) for t in range(a.shape[0])], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ statistics
def db_statistics(per_frame: np.ndarray) -> Tuple[float, float, float]:
    """(mean, recall = fraction of frames strictly above 0.5, decay = mean of the first minus the last of four
    overlapping quartile bins) of one object's per-frame values."""
    x = np.asarray(per_frame, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore"):
        mean = float(np.nanmean(x))
        recall = float(np.nanmean(x > 0.5))
    # bin edges as the official code computes them (the 1e-10 makes halves round up); it also casts them to uint8,
    # which only matters beyond 256 scored frames and is not reproduced
    ids = (np.round(np.linspace(1, len(x), 5) + 1e-10) - 1).astype(np.int64)
    bins = [x[ids[i]:ids[i + 1] + 1] for i in range(4)]
    with np.errstate(invalid="ignore"):
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


# ------------------------------------------------------------------------------------------------ sequences
def num_objects(first_gt: np.ndarray) -> int:
    """K: the largest id of the first ground-truth frame once void is background; every id 1..K is an object."""
    g = np.asarray(first_gt)
    g = np.where(g == VOID, 0, g)
    return int(g.max()) if g.size else 0


def object_masks(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, T, H, W) booleans ``labels == k`` for k = 1..n."""
    labels = np.asarray(labels)
    return np.stack([labels == k for k in range(1, n + 1)]) if n else np.zeros((0, *labels.shape), bool)


def evaluate_sequence(gt: np.ndarray, pred: np.ndarray, name: str = "sequence",
                      bound_th: float = BOUND_TH) -> Tuple[np.ndarray, np.ndarray]:
    """The semi-supervised evaluation of one sequence: J and F (K, T-2) over frames 1..T-2 (the first frame is
    given, the last is left out by convention), objects 1..K of the first ground-truth frame, void as background
    and no void mask; missing predicted objects are empty masks, extra ones an error."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise UpbenchError(f"{name}: ground truth {gt.shape} and prediction {pred.shape} must be (T, H, W) stacks "
                           "of the same shape")
    if gt.shape[0] < 3:
        raise UpbenchError(f"{name}: {gt.shape[0]} frame(s); the DAVIS evaluation scores frames 1..T-2, so a "
                           "sequence needs at least 3 frames")
    k = num_objects(gt[0])
    gt = np.where(gt == VOID, 0, gt)[1:-1]
    pred = pred[1:-1]
    n_pred = int(pred.max()) if pred.size else 0
    if n_pred > k:
        raise UpbenchError(f"{name}: the prediction has object id {n_pred} but the first annotation has {k} "
                           "object(s); predictions may only use the first frame's ids")
    gt_masks, pred_masks = object_masks(gt, k), object_masks(pred, k)
    j = np.zeros((k, gt.shape[0]), dtype=np.float64)
    f = np.zeros((k, gt.shape[0]), dtype=np.float64)
    for i in range(k):
        j[i] = db_eval_iou(gt_masks[i], pred_masks[i])
        f[i] = db_eval_boundary(gt_masks[i], pred_masks[i], bound_th=bound_th)
    return j, f


def aggregate(per_sequence: Iterable[Tuple[str, np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """The official tables from per-sequence (name, J (K, n), F (K, n)): per object (``<seq>_<k>``) mean / recall /
    decay, and globally the plain mean of each over **all objects** (not sequences); J&F-Mean = (J-Mean + F-Mean)/2."""
    names: List[str] = []
    stats: Dict[str, List[float]] = {f"{m}-{s}": [] for m in "JF" for s in ("Mean", "Recall", "Decay")}
    for name, j, f in per_sequence:
        for i in range(j.shape[0]):
            names.append(f"{name}_{i + 1}")
            for metric, values in (("J", j[i]), ("F", f[i])):
                for stat, value in zip(("Mean", "Recall", "Decay"), db_statistics(values)):
                    stats[f"{metric}-{stat}"].append(value)
    glob: Dict[str, float] = {}
    for key, values in stats.items():
        glob[key] = float(np.mean(values)) if values else math.nan
    glob["J&F-Mean"] = (glob["J-Mean"] + glob["F-Mean"]) / 2.0
    return {"objects": names, "per_object": {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()},
            "global": glob}


def evaluate(sequences: Iterable[Mapping[str, Any]], bound_th: float = BOUND_TH) -> Dict[str, Any]:
    """``sequences``: ``{name, gt (T, H, W), pred (T, H, W)}`` in the order of the split file.  Returns
    :func:`aggregate`'s tables plus ``per_sequence``: name -> (J, F) arrays of the scored frames."""
    per_sequence = {}
    for seq in sequences:
        per_sequence[seq["name"]] = evaluate_sequence(seq["gt"], seq["pred"], seq["name"], bound_th)
    out = aggregate((name, j, f) for name, (j, f) in per_sequence.items())
    out["per_sequence"] = per_sequence
    return out
