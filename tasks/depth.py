"""Depth linear probe (the JAFAR / Probe3D protocol): frozen backbone + frozen upsampler, a 1x1-conv "bin" head
(256 linear bins over [1e-3, 10], ReLU + 0.1, normalised, expectation), SigLoss + 0.5 x multi-scale gradient
loss (``task.probe.grad_loss``: Probe3D's fixed loss, or JAFAR's released one), AdamW; per-image depth metrics
averaged over the validation images."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, Pipeline, TableSpec, Task

from . import register
from ._probe import check_probe_cfg, load_head, resize_prediction, save_head, train_probe

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0
METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "log_rmse", "log10", "silog")


class BinDepthHead(nn.Module):
    """Conv1x1(in -> bins); ReLU + 0.1, normalised over the bins; expectation over linearly spaced bin centres."""

    def __init__(self, in_channels: int, bins: int = 256, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins).view(1, bins, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.relu(self.conv(x)) + 0.1
        p = p / p.sum(1, keepdim=True)
        return (p * self.centres).sum(1, keepdim=True)


def valid_mask(gt: torch.Tensor, max_depth: float = MAX_DEPTH) -> torch.Tensor:
    return (gt > 0) & (gt <= max_depth)


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, warmup: bool = False,
             variance_focus: float = 0.15, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss (AdaBins): sqrt(var(g) + 0.15 mean(g)^2), g = log(pred+eps) - log(gt+eps) over
    the valid pixels; during warm-up only sqrt(0.15 mean(g)^2)."""
    g = torch.log(pred[mask] + eps) - torch.log(gt[mask] + eps)
    if g.numel() < 2:
        return pred.sum() * 0.0
    if warmup:
        return torch.sqrt(variance_focus * g.mean() ** 2)
    return torch.sqrt(torch.var(g) + variance_focus * g.mean() ** 2)


GRAD_LOSSES = ("probe3d", "jafar_released")


def _log_diff_terms(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float):
    """The four scales of MegaDepth's gradient loss as Probe3D / JAFAR take them: the full map, then every 2nd, 4th and
    6th pixel; at each, d = (log(pred + eps) - log(gt + eps)) on the valid pixels, the valid mask, and its count."""
    scales = [(pred, gt, mask)] + [(pred[..., ::2 * i, ::2 * i], gt[..., ::2 * i, ::2 * i], mask[..., ::2 * i, ::2 * i])
                                   for i in range(1, 4)]
    for p, g, m in scales:
        m = m.to(p.dtype)
        n = m.sum()
        if n > 0:   # (the official code divides by zero here on a map with no valid pixel)
            yield (torch.log(p + eps) - torch.log(g + eps)) * m, m, n


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Probe3D's gradient loss after its Nov-2025 fix (mbanani/probe3d ``evals/utils/losses.py``): at strides 1, 2, 4
    and 6, the summed absolute differences of d between valid pixels two apart, vertically and horizontally, over the
    number of valid pixels at that stride.  ``pred``, ``gt``, ``mask``: (B, 1, H, W)."""
    total = pred.new_zeros(())
    for d, m, n in _log_diff_terms(pred, gt, mask, eps):
        v = (d[..., :-2, :] - d[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
        h = (d[..., :, :-2] - d[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


def gradient_loss_jafar_released(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor,
                                 eps: float = 1e-3) -> torch.Tensor:
    """The gradient loss as JAFAR released it (``src/loss.py``, from Probe3D's first commit), indexing included: on
    (B, 1, H, W) maps its "vertical" differences compare batch items two apart and its "horizontal" ones slice the
    single channel, so the term is exactly 0 for batches of 1 or 2 and compares whole images for larger batches."""
    total = pred.new_zeros(())
    for d, m, n in _log_diff_terms(pred, gt, mask, eps):
        v = (d[0:-2, :] - d[2:, :]).abs() * m[0:-2, :] * m[2:, :]
        h = (d[:, 0:-2] - d[:, 2:]).abs() * m[:, 0:-2] * m[:, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


def grad_loss_fn(name: str):
    if name == "probe3d":
        return gradient_loss
    if name == "jafar_released":
        return gradient_loss_jafar_released
    raise UpbenchError(f"unknown task.probe.grad_loss '{name}'; valid: {', '.join(GRAD_LOSSES)}")


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = MIN_DEPTH,
                  max_depth: float = MAX_DEPTH) -> Optional[Dict[str, float]]:
    """Metrics of one image on the pixels with min_depth < gt < max_depth (None when there are none):
    delta_k = % of max(gt/pred, pred/gt) < 1.25^k; abs_rel; sq_rel; RMSE; log-RMSE; log10; SILog (x100)."""
    m = (gt > min_depth) & (gt < max_depth)
    if not m.any():
        return None
    p, g = pred[m].double().clamp_min(min_depth), gt[m].double()
    ratio = torch.maximum(g / p, p / g)
    err = torch.log(p) - torch.log(g)
    return {
        "d1": (ratio < 1.25).double().mean().item() * 100,
        "d2": (ratio < 1.25 ** 2).double().mean().item() * 100,
        "d3": (ratio < 1.25 ** 3).double().mean().item() * 100,
        "abs_rel": ((g - p).abs() / g).mean().item(),
        "sq_rel": ((g - p) ** 2 / g).mean().item(),
        "rmse": math.sqrt(((g - p) ** 2).mean().item()),
        "log_rmse": math.sqrt((err ** 2).mean().item()),
        "log10": (torch.log10(p) - torch.log10(g)).abs().mean().item(),
        "silog": math.sqrt(max(0.0, (err ** 2).mean().item() - err.mean().item() ** 2)) * 100,
    }


def target(item: Dict[str, Any], flip: bool) -> torch.Tensor:
    """An item's ground truth as the probe sees it: flipped with the image, or -- for pseudo ground truth computed
    on the flipped image itself (``coco_depth`` with ``pseudo_protocol=jafar``) -- that map."""
    if flip:
        return item["depth_flip"] if "depth_flip" in item else item["depth"].flip(-1)
    return item["depth"]


def head_input(pipe: Pipeline, item: Dict[str, Any], flip: bool, size, use_cls: bool) -> torch.Tensor:
    """Upsampled features, optionally concatenated with the L2-normalised CLS token broadcast to every pixel."""
    feats = pipe.item_upsampled(item, flip, size)
    if not use_cls:
        return feats
    _, prefix = pipe.item_features(item, flip)
    if prefix.shape[0] == 0:
        raise UpbenchError(f"backbone '{pipe.backbone.name}' has no CLS token; use task.probe.cls_token=false")
    cls = F.normalize(prefix[0].float(), dim=0).to(feats.device)
    return torch.cat([feats, cls[:, None, None].expand(-1, *feats.shape[-2:])], 0)


@register("depth")
class DepthProbe(Task):
    dataset_kinds = ("depth",)
    fits_train_split = True
    dataset_hint = "a depth dataset (nyuv2, coco_depth, depth_folder, middlebury, demo_depth)"
    table = TableSpec(
        title="Depth linear probes",
        metrics=(Metric("d1", "δ1"), Metric("rmse", "RMSE", "min", "{:.3f}")),
        group_by=("backbone", "config.protocol.name", "config.task.probe.lr_schedule", "config.task.resize_at",
                  "config.task.probe.grad_loss", "config.task.input_norm"),
        group_labels={"config.protocol.name": "protocol"},
        paper={"dinov2_s14": "table1"},
        paper_datasets={"coco_depth": "cocostuff"},   # the papers' depth probe runs on COCO images
        paper_metrics={"d1": "delta1"},
        position=20,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        probe = cfg["task"]["probe"]
        check_probe_cfg(probe)
        lo, hi, bins = probe.get("min_depth"), probe.get("max_depth"), probe.get("bins")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi and math.isfinite(hi)):
            raise UpbenchError(f"task.probe.min_depth={lo} / max_depth={hi}: expected 0 < min_depth < max_depth")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise UpbenchError(f"task.probe.bins={bins}: expected an integer >= 2")
        grad_loss_fn(probe.get("grad_loss", "probe3d"))
        if probe.get("empty_gt", "skip") not in ("skip", "nan"):
            raise UpbenchError(f"unknown task.probe.empty_gt '{probe.get('empty_gt')}'; valid: skip, nan")

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, device, train_set, val_set = job.pipe, job.device, job.train_set, job.val_set
        probe_cfg = job.cfg["probe"]
        use_cls = bool(probe_cfg["cls_token"])
        resize_at = job.cfg.get("resize_at", "features")
        if resize_at == "labels":
            raise UpbenchError("task.resize_at=labels is the segmentation probes' option; depth takes features or "
                               "logits")
        grid = tuple(pipe.item_features(train_set[0])[0].shape[-2:])
        size = pipe.probe_size(grid, (train_set.img_size, train_set.img_size), resize_at)
        head = BinDepthHead(pipe.backbone.channels * (2 if use_cls else 1), int(probe_cfg["bins"]),
                            float(probe_cfg["min_depth"]), float(probe_cfg["max_depth"])).to(device)
        warmup_iters, grad_w = int(probe_cfg["sig_warmup_iters"]), float(probe_cfg["gradient_weight"])
        grad_loss = grad_loss_fn(probe_cfg.get("grad_loss", "probe3d"))
        empty_gt = probe_cfg.get("empty_gt", "skip")
        if empty_gt not in ("skip", "nan"):
            raise UpbenchError(f"unknown task.probe.empty_gt '{empty_gt}'; valid: skip, nan")
        max_depth = float(probe_cfg["max_depth"])

        def batch_loss(items, flips, step):
            x = torch.stack([head_input(pipe, it, f, size, use_cls) for it, f in zip(items, flips)]).to(device)
            gt = torch.stack([target(it, f) for it, f in zip(items, flips)])[:, None]
            gt = gt.to(device)
            pred = resize_prediction(head(x).float(), gt.shape[-2:])   # the loss in float32 under any compute_dtype
            mask = valid_mask(gt, max_depth)
            return sig_loss(pred, gt, mask, warmup=step < warmup_iters) + grad_w * grad_loss(pred, gt, mask)

        epoch_s, losses = train_probe(train_set, probe_cfg, head.parameters(), job.seed, batch_loss, job.log,
                                      checkpoint=job.checkpoint, autocast=pipe.autocast, loader=pipe.loader)

        per_image: List[Dict[str, float]] = []
        with torch.inference_mode():
            for item in bar(pipe.items(val_set), total=len(val_set), desc="evaluate"):
                x = head_input(pipe, item, False, size, use_cls)[None].to(device)
                gt = item["depth"].to(device)
                with pipe.autocast():
                    pred = resize_prediction(head(x).float(), gt.shape[-2:])
                m = depth_metrics(pred[0, 0], gt, float(probe_cfg["min_depth"]), max_depth)
                if m is not None:
                    per_image.append(m)
                elif empty_gt == "nan":   # the official code averages the NaN of such an image in
                    raise RunFailed(f"depth: validation image {item['id']} has no ground truth inside "
                                       "(min_depth, max_depth); with task.probe.empty_gt=nan the official average is "
                                       "NaN, so there is no result (task.probe.empty_gt=skip leaves it out)")
        if not per_image:
            raise RunFailed("depth: no validation image has ground truth inside (min_depth, max_depth)")
        metrics: Dict[str, Any] = {k: sum(m[k] for m in per_image) / len(per_image) for k in METRICS}
        metrics["final_train_loss"] = losses[-1] if losses else None
        return {
            "metrics": metrics,
            "timing": {"probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)), "probe_epochs_s": epoch_s},
            "note": losses.note(probe_cfg["lr"]),
            "data": {"n_train": len(train_set), "n_val": len(val_set), "n_val_scored": len(per_image),
                     "img_size": train_set.img_size, "probe_size": list(size), "feature_grid": list(grid),
                     "head_input": "features+cls" if use_cls else "features",
                     "grad_loss": probe_cfg.get("grad_loss", "probe3d")},
            "artefacts": {"probe": save_head(job, head, "depth", bins=int(probe_cfg["bins"]),
                                             min_depth=float(probe_cfg["min_depth"]), max_depth=max_depth,
                                             cls_token=use_cls, probe_size=list(size))},
        }

    def predict(self, pipe, head_path: str, items, size) -> list:
        """Depth maps (H, W) in metres of ``items`` from the head a finished run saved."""
        state, meta = load_head(head_path)
        use_cls = bool(meta["cls_token"])
        head = BinDepthHead(pipe.backbone.channels * (2 if use_cls else 1), int(meta["bins"]),
                            float(meta["min_depth"]), float(meta["max_depth"]))
        head.load_state_dict(state)
        head = head.to(pipe.device).eval()
        out = []
        probe_size = tuple(meta.get("probe_size") or size)
        with torch.inference_mode():
            for item in items:
                x = head_input(pipe, item, False, probe_size, use_cls)[None].to(pipe.device)
                out.append(resize_prediction(head(x), item["depth"].shape[-2:])[0, 0].cpu())
        return out
