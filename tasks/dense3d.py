"""Depth and surface normals with a DPT-style head (LoftUp Table 3, the Probe3D protocol): frozen backbone + frozen
upsampler, one 7-conv DPT head per target on the (upsampled) features, AdamW with Probe3D's warm-up + cosine
schedule.

* Depth: 256 linear bins over [min_depth, max_depth] (Probe3D ``bindepth``), loss 10 x SigLoss (sigma 0.85) + 0.5 x
  the multi-scale gradient loss; metrics per image (Probe3D ``evaluate_depth``): RMSE and delta recalls, scale-aware
  and scale-invariant (prediction least-squares scaled and shifted onto the ground truth first).
* Normals: 3 direction channels + 1 concentration (Probe3D's uncertainty-aware angular loss, Bae et al.); metrics
  (Probe3D ``evaluate_surface_norm``): RMSE of the angular error in degrees, recall at 11.25 / 22.5 / 30 degrees.
  Ground truth is derived from the ground-truth depth as Probe3D derives NAVI's (``compute_normal``): pixels are
  back-projected with the item's focal length (``focal_px``; else ``task.normals.focal`` x the image side) and the
  normal is the mean of the four cross products of neighbouring 3-D points.

Both heads train in one loop on the same batches: their parameters are disjoint and AdamW's update of a parameter
depends on its own gradient only, so this equals two separate runs and computes the features once."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, TableSpec, Task

from . import register
from ._probe import check_probe_cfg, save_head, train_probe
from .depth import grad_loss_fn

TARGETS = ("depth", "normals")
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


# ---------------------------------------------------------------------------------------------------- the head
class ResidualConvUnit(nn.Module):
    """conv - ReLU - conv - ReLU, plus the input (DPT / Probe3D)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.ReLU(True),
                                  nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class DPTHead(nn.Module):
    """The 7 conv layers of a one-scale DPT decoder (Probe3D's DPT fed a single feature map): a 1x1 projection to
    ``hidden``, one fusion block (two residual conv units, 4 convs), and the output convs (3x3, ReLU, 3x3).  It keeps
    the input's resolution: the upsampler, not the head, decides how dense the features are."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 512, kernel: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, 1)
        self.fuse = nn.Sequential(ResidualConvUnit(hidden, kernel), ResidualConvUnit(hidden, kernel))
        self.out = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(True),
                                 nn.Conv2d(hidden, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fuse(self.proj(x)))


def bins_to_depth(logits: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Probe3D ``DepthBinPrediction`` (linear bins, AdaBins' linear norm): ReLU + 0.1, normalised, expectation."""
    p = F.relu(logits) + 0.1
    p = p / p.sum(1, keepdim=True)
    centres = torch.linspace(min_depth, max_depth, logits.shape[1], device=logits.device, dtype=p.dtype)
    return torch.einsum("bkhw,k->bhw", p, centres)[:, None]


# ---------------------------------------------------------------------------------------------------- normals
PRINCIPAL_POINTS = ("corner", "centre")


def normals_from_depth(depth: torch.Tensor, focal_px: float, principal: str = "corner") -> torch.Tensor:
    """(H, W) depth (0 = none) -> (3, H, W) unit normals in the camera frame (x right, y down, z forward; a normal
    points away from the camera), 0 where undefined (no depth at the pixel or a neighbour, image border).
    Probe3D ``compute_normal``: back-project pixel centres (u + 0.5, v + 0.5) with focal ``focal_px``, take the
    differences to the left / top / right / bottom neighbours and average the cross products (l x t, t x r, r x b,
    b x l).  ``principal``: "corner" is Probe3D's (its intrinsics have no principal point, so the camera centre sits
    at the image's top-left corner: a shear that tilts every non-fronto-parallel plane); "centre" is the pinhole
    camera with the principal point at the image centre."""
    if principal not in PRINCIPAL_POINTS:
        raise UpbenchError(f"unknown task.normals.principal_point {principal!r}; "
                           f"valid: {', '.join(PRINCIPAL_POINTS)}")
    d = depth.double().clone()
    valid = d > 0
    d[~valid] = 1e6   # as Probe3D: a missing neighbour is very far, so the normal there is meaningless (masked below)
    H, W = d.shape
    ys = (torch.arange(H, dtype=torch.float64) + 0.5)[:, None].expand(H, W)
    xs = (torch.arange(W, dtype=torch.float64) + 0.5)[None, :].expand(H, W)
    if principal == "centre":
        xs, ys = xs - W / 2, ys - H / 2
    xyz = torch.stack([xs * d / focal_px, ys * d / focal_px, d])
    c = xyz[:, 1:-1, 1:-1]
    dl, dt = xyz[:, 1:-1, :-2] - c, xyz[:, :-2, 1:-1] - c
    dr, db = xyz[:, 1:-1, 2:] - c, xyz[:, 2:, 1:-1] - c
    n = (torch.linalg.cross(dl, dt, dim=0) + torch.linalg.cross(dt, dr, dim=0) + torch.linalg.cross(dr, db, dim=0)
         + torch.linalg.cross(db, dl, dim=0)) / 4.0
    out = torch.zeros(3, H, W, dtype=torch.float64)
    out[:, 1:-1, 1:-1] = F.normalize(n, dim=0)
    # defined only where the pixel and its four neighbours have depth (a missing one is 1e6 m away)
    full = torch.zeros(H, W, dtype=torch.bool)
    full[1:-1, 1:-1] = valid[1:-1, 1:-1] & valid[1:-1, :-2] & valid[:-2, 1:-1] & valid[1:-1, 2:] & valid[2:, 1:-1]
    return (out * full).float()


def angular_errors(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Degrees between (B, 3+, H, W) predicted and (B, 3, H, W) true normals (first three channels)."""
    cos = torch.cosine_similarity(pred[:, :3].double(), gt.double(), dim=1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


def normal_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> Optional[Dict[str, float]]:
    """One image's normal metrics on ``valid`` pixels (None when there are none): RMSE of the angular error (degrees)
    and the % of pixels within 11.25 / 22.5 / 30 degrees."""
    if not bool(valid.any()):
        return None
    err = angular_errors(pred, gt)[valid[:, 0] if valid.dim() == 4 else valid]
    out = {"normal_rmse": math.sqrt(float((err ** 2).mean()))}
    for t in NORMAL_THRESHOLDS:
        out[f"normal_r{int(t)}"] = float((err < t).double().mean()) * 100
    return out


def angular_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Probe3D's uncertainty-aware angular loss on the valid pixels: kappa = ELU(channel 3) + 1.01,
    log(1 + exp(-kappa pi)) - log(kappa^2 + 1) + kappa x angle."""
    ang = torch.cosine_similarity(pred[:, :3], gt, dim=1).clamp(-1 + eps, 1 - eps).acos()
    kappa = F.elu(pred[:, 3]) + 1.01
    loss = torch.log1p(torch.exp(-kappa * math.pi)) - torch.log(kappa ** 2 + 1) + kappa * ang
    return loss[valid].mean() if bool(valid.any()) else pred.sum() * 0.0


# ---------------------------------------------------------------------------------------------------- depth
def sig_loss_probe3d(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, sigma: float = 0.85,
                     eps: float = 1e-3) -> torch.Tensor:
    """Probe3D / DINOv2 SigLoss: sqrt(mean(g^2) - sigma mean(g)^2), g = log(pred + eps) - log(gt + eps)."""
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    if g.numel() == 0:
        return pred.sum() * 0.0
    return torch.sqrt((g ** 2).mean() - sigma * g.mean() ** 2)


def match_scale_and_shift(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(H, W) prediction after the least-squares scale and shift onto ``gt``'s valid (> 0) pixels (Probe3D)."""
    m = (gt > 0).double()
    p, g = pred.double(), gt.double()
    a00, a01, a11 = (m * p * p).sum(), (m * p).sum(), m.sum()
    b0, b1 = (m * p * g).sum(), (m * g).sum()
    det = a00 * a11 - a01 * a01
    if float(det) == 0.0:
        return pred
    scale, shift = (a11 * b0 - a01 * b1) / det, (-a01 * b0 + a00 * b1) / det
    return (p * scale + shift).to(pred.dtype)


def depth_metrics_probe3d(pred: torch.Tensor, gt: torch.Tensor, scale_invariant: bool) -> Optional[Dict[str, float]]:
    """Probe3D ``evaluate_depth`` of one (H, W) image on gt > 0 (None when there is none): delta recalls in % and
    RMSE in the ground truth's unit; ``scale_invariant`` matches scale and shift first."""
    valid = gt > 0
    if not bool(valid.any()):
        return None
    if scale_invariant:
        pred = match_scale_and_shift(pred, gt)
    p, g = pred[valid].double(), gt[valid].double()
    ratio = torch.maximum(g / p.clamp_min(1e-9), p / g.clamp_min(1e-9))
    out = {f"d{k}": float((ratio < 1.25 ** k).double().mean()) * 100 for k in (1, 2, 3)}
    out["rmse"] = math.sqrt(float(((g - p) ** 2).mean()))
    return out


# ---------------------------------------------------------------------------------------------------- the task
@register("dense3d")
class Dense3D(Task):
    dataset_kinds = ("depth",)
    fits_train_split = True
    dataset_hint = "a depth dataset (navi, demo_depth, depth_folder, nyuv2, middlebury)"
    table = TableSpec(
        title="Depth and surface normals (DPT head, Probe3D protocol)",
        metrics=(Metric("depth_rmse", "depth RMSE", "min", "{:.4f}"), Metric("depth_si_d1", "depth δ1 (SI)"),
                 Metric("normal_rmse", "normal RMSE (°)", "min"), Metric("normal_r30", "normal <30°")),
        primary="depth_rmse",
        group_by=("backbone", "config.protocol.name", "config.task.probe.lr_schedule", "config.task.head.hidden"),
        group_labels={"config.protocol.name": "protocol", "config.task.head.hidden": "head width"},
        paper={"dinov2_s14": "loftup_tables34"},
        paper_metrics={"depth_si_d1": "depth_recall", "normal_r30": "normal_recall"},
        position=22,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        task = cfg["task"]
        probe = task["probe"]
        check_probe_cfg(probe)
        warm = probe.get("warmup_epochs", 0.0)
        if isinstance(warm, bool) or not isinstance(warm, (int, float)) or not 0 <= warm < probe["epochs"]:
            raise UpbenchError(f"task.probe.warmup_epochs={warm}: expected a number in [0, task.probe.epochs)")
        lo, hi, bins = probe.get("min_depth"), probe.get("max_depth"), probe.get("bins")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi and math.isfinite(hi)):
            raise UpbenchError(f"task.probe.min_depth={lo} / max_depth={hi}: expected 0 < min_depth < max_depth")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise UpbenchError(f"task.probe.bins={bins}: expected an integer >= 2")
        targets = task.get("targets")
        if not isinstance(targets, (list, tuple)) or not targets or any(t not in TARGETS for t in targets):
            raise UpbenchError(f"task.targets={targets}: expected a non-empty list of {', '.join(TARGETS)}, "
                               "e.g. task.targets=[depth,normals]")
        head = task.get("head") or {}
        for key in ("hidden", "kernel"):
            v = head.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (key == "kernel" and v % 2 == 0):
                raise UpbenchError(f"task.head.{key}={v}: expected a positive" + (" odd" if key == "kernel" else "")
                                   + " integer")
        focal = (task.get("normals") or {}).get("focal")
        if isinstance(focal, bool) or not isinstance(focal, (int, float)) or not focal > 0:
            raise UpbenchError(f"task.normals.focal={focal}: expected the focal length as a positive multiple of the "
                               "image side (used when a dataset has no camera)")
        if (task.get("normals") or {}).get("principal_point", "corner") not in PRINCIPAL_POINTS:
            raise UpbenchError(f"unknown task.normals.principal_point '{task['normals'].get('principal_point')}'; "
                               f"valid: {', '.join(PRINCIPAL_POINTS)}")
        grad_loss_fn(probe.get("grad_loss", "probe3d"))
        if task.get("resize_at", "features") not in ("features", "logits"):
            raise UpbenchError(f"task.resize_at={task.get('resize_at')}: dense3d takes features or logits")

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, device, train_set, val_set = job.pipe, job.device, job.train_set, job.val_set
        cfg, probe_cfg = job.cfg, job.cfg["probe"]
        targets = list(cfg["targets"])
        lo, hi, nbins = float(probe_cfg["min_depth"]), float(probe_cfg["max_depth"]), int(probe_cfg["bins"])
        grad_w, sig_w = float(probe_cfg["gradient_weight"]), float(probe_cfg["sig_weight"])
        grad_loss = grad_loss_fn(probe_cfg.get("grad_loss", "probe3d"))
        focal_default = float(cfg["normals"]["focal"])
        principal = cfg["normals"].get("principal_point", "corner")
        grid = tuple(pipe.item_features(train_set[0])[0].shape[-2:])
        size = pipe.probe_size(grid, (train_set.img_size, train_set.img_size), cfg.get("resize_at", "features"))
        hidden, kernel = int(cfg["head"]["hidden"]), int(cfg["head"]["kernel"])
        channels = pipe.backbone.channels
        heads = nn.ModuleDict()
        if "depth" in targets:
            heads["depth"] = DPTHead(channels, nbins, hidden, kernel)
        if "normals" in targets:
            heads["normals"] = DPTHead(channels, 4, hidden, kernel)
        heads = heads.to(device)
        normal_cache: Dict[Any, torch.Tensor] = {}
        focal_source = set()

        def gt_normals(item: Dict[str, Any], flip: bool) -> torch.Tensor:
            key = (item.get("source"), item["id"], flip)
            if key not in normal_cache:
                depth = item["depth"].flip(-1) if flip else item["depth"]
                focal = item.get("focal_px")
                focal_source.add("dataset" if focal else "task.normals.focal")
                normal_cache[key] = normals_from_depth(depth, float(focal or focal_default * depth.shape[-1]),
                                                       principal)
            return normal_cache[key]

        def predict(x: torch.Tensor, out_size) -> Dict[str, torch.Tensor]:
            out = {}
            if "depth" in heads:
                logits = F.interpolate(heads["depth"](x).float(), size=out_size, mode="bilinear", align_corners=False)
                out["depth"] = bins_to_depth(logits, lo, hi)
            if "normals" in heads:   # Probe3D resizes normal predictions bicubically
                out["normals"] = F.interpolate(heads["normals"](x).float(), size=out_size, mode="bicubic",
                                               align_corners=False)
            return out

        def batch_loss(items, flips, _step):
            x = torch.stack([pipe.item_upsampled(it, f, size) for it, f in zip(items, flips)]).to(device)
            gt = torch.stack([it["depth"].flip(-1) if f else it["depth"] for it, f in zip(items, flips)])[:, None]
            gt = gt.to(device)
            pred = predict(x, gt.shape[-2:])
            loss = x.new_zeros(())
            if "depth" in pred:
                g = torch.where(gt > hi, torch.zeros_like(gt), gt)   # beyond max_depth: ignored, as Probe3D
                valid = g > 0
                loss = loss + sig_w * sig_loss_probe3d(pred["depth"], g, valid) + grad_w * grad_loss(pred["depth"],
                                                                                                     g, valid)
            if "normals" in pred:
                n = torch.stack([gt_normals(it, f) for it, f in zip(items, flips)]).to(device)
                loss = loss + angular_loss(pred["normals"], n, n.abs().sum(1) > 0)
            return loss

        epoch_s, losses = train_probe(train_set, probe_cfg, heads.parameters(), job.seed, batch_loss, job.log,
                                      checkpoint=job.checkpoint, autocast=pipe.autocast, loader=pipe.loader)

        per_image: Dict[str, List[Dict[str, float]]] = {"depth": [], "depth_si": [], "normals": []}
        heads.eval()
        with torch.inference_mode():
            for item in bar(pipe.items(val_set), total=len(val_set), desc="evaluate"):
                x = pipe.item_upsampled(item, False, size)[None].to(device)
                gt = item["depth"].to(device)
                with pipe.autocast():
                    pred = predict(x, gt.shape[-2:])
                if "depth" in pred:
                    g = torch.where(gt > hi, torch.zeros_like(gt), gt)
                    for key, si in (("depth", False), ("depth_si", True)):
                        m = depth_metrics_probe3d(pred["depth"][0, 0], g, si)
                        if m is not None:
                            per_image[key].append(m)
                if "normals" in pred:
                    n = gt_normals(item, False).to(device)[None]
                    m = normal_metrics(pred["normals"], n, n.abs().sum(1) > 0)
                    if m is not None:
                        per_image["normals"].append(m)
        metrics: Dict[str, Any] = {}
        for key, prefix in (("depth", "depth_"), ("depth_si", "depth_si_")):
            if "depth" in targets:
                if not per_image[key]:
                    raise RunFailed("dense3d: no validation image has depth ground truth inside (0, max_depth]")
                for k in per_image[key][0]:
                    metrics[prefix + k] = sum(m[k] for m in per_image[key]) / len(per_image[key])
        if "normals" in targets:
            if not per_image["normals"]:
                raise RunFailed("dense3d: no validation image has a pixel with a defined surface normal (depth at the "
                                "pixel and its four neighbours); check the depth ground truth")
            for k in per_image["normals"][0]:
                metrics[k] = sum(m[k] for m in per_image["normals"]) / len(per_image["normals"])
        metrics["final_train_loss"] = losses[-1] if losses else None
        return {
            "metrics": metrics,
            "timing": {"probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)), "probe_epochs_s": epoch_s},
            "note": losses.note(probe_cfg["lr"]),
            "data": {"n_train": len(train_set), "n_val": len(val_set), "img_size": train_set.img_size,
                     "n_val_scored_depth": len(per_image["depth"]), "n_val_scored_normals": len(per_image["normals"]),
                     "probe_size": list(size), "feature_grid": list(grid), "targets": targets,
                     "normals_focal": sorted(focal_source), "normals_principal_point": principal},
            "artefacts": {"probe": save_head(job, heads, "dense3d", targets=targets, bins=nbins, min_depth=lo,
                                             max_depth=hi, hidden=hidden, kernel=kernel, probe_size=list(size))},
        }
