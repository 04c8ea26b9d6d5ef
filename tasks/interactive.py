"""Interactive segmentation (LoftUp Table 4, its modified SimpleClick): the frozen backbone gets the click maps
through a single-layer click encoder whose output is added to the patch embedding (the backbone's ``patch_bias``
input), the frozen upsampler brings the features to the image's size and a 3-layer conv decoder predicts the mask.
Click encoder and decoder are trained with the normalized focal loss (Adam); the metric is IoU@1: the IoU after one
click at the object pixel farthest from its boundary.

The backbone features depend on the click (and on the click encoder being trained), so they never come from the
per-image feature cache: every step runs the backbone and the upsampler afresh (``Pipeline.encode_with_bias``,
``Pipeline.upsample(grad=True)``), with gradients flowing through both (frozen) to the click encoder."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, TableSpec, Task

from . import register
from ._probe import check_probe_cfg, resize_prediction, save_head, train_probe


#: the label of void pixels in every mask layout upbench reads (the datasets' ``ignore_index``)
IGNORE = 255


# ---------------------------------------------------------------------------------------------------- clicks
def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every object pixel to the nearest non-object pixel, the image border counting as
    outside (RITM / SimpleClick pad the mask with zeros before their distance transform); 0 off the object."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    return distance_transform_edt(padded)[1:-1, 1:-1]


def first_click(mask: np.ndarray) -> Tuple[int, int]:
    """(row, col) of the object pixel farthest from the object's boundary; ties: the first in row-major order (as
    RITM's ``np.argwhere(dt == dt.max())[0]``).  ``mask``: 1 = object (ignore / background otherwise)."""
    obj = np.asarray(mask) == 1
    if not obj.any():
        raise ValueError("an empty mask has no click")
    dt = boundary_distance(obj)
    r, c = np.argwhere(dt == dt.max())[0]
    return int(r), int(c)


def training_click(mask: np.ndarray, gen: np.random.Generator) -> Optional[Tuple[int, int]]:
    """A positive click for training: uniform over the object pixels at least half as far from the boundary as the
    farthest one (so the decoder sees clicks near, not only at, the evaluation click); None for an empty mask (an
    instance that vanished at this size: no click, an all-background target)."""
    if not (np.asarray(mask) == 1).any():
        return None
    dt = boundary_distance(np.asarray(mask) == 1)
    cand = np.argwhere(dt >= 0.5 * dt.max()) if dt.max() > 0 else np.argwhere(np.asarray(mask) == 1)
    r, c = cand[int(gen.integers(len(cand)))]
    return int(r), int(c)


def click_maps(clicks: Sequence[Optional[Tuple[int, int]]], size: Tuple[int, int], radius: float) -> torch.Tensor:
    """(B, 3, H, W) SimpleClick inputs for one positive click per item: a disk of ``radius`` px around the positive
    click (none for None), no negative click, no previous mask."""
    H, W = size
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    maps = torch.zeros(len(clicks), 3, H, W)
    for b, click in enumerate(clicks):
        if click is None:
            continue
        r, c = click
        maps[b, 0] = (((ys - r) ** 2 + (xs - c) ** 2) <= radius ** 2).float()
    return maps


# ---------------------------------------------------------------------------------------------------- the model
class ClickEncoder(nn.Module):
    """One conv layer with kernel = stride = the backbone's embedding stride: click maps -> patch-embedding space
    (SimpleClick's ``maps_embed``)."""

    def __init__(self, embed_channels: int, stride: int, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_channels, stride, stride)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.proj(maps)


class ConvDecoder(nn.Module):
    """3 conv layers on the (upsampled) features: 3x3 - ReLU - 3x3 - ReLU - 1x1 -> one mask logit per pixel."""

    def __init__(self, in_channels: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(True),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(True), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0,
                          eps: float = 1e-12, ignore: int = IGNORE) -> torch.Tensor:
    """RITM / SimpleClick ``NormalizedFocalLossSigmoid`` (detached normaliser, size-averaged), per item (B,):
    p_t = 1 - |y - sigmoid(x)|; beta = (1 - p_t)^gamma rescaled so that it sums to the number of labelled pixels;
    loss = sum(-alpha_t beta log(min(p_t + eps, 1))) / (labelled pixels + eps), alpha_t = alpha on the object and
    1 - alpha off it.  ``logits``, ``target``: (B, H, W); ``ignore`` pixels count nowhere."""
    weight = (target != ignore).float()
    y = torch.where(target == ignore, torch.zeros_like(target), target).float()
    p = torch.sigmoid(logits.float())
    a = torch.where(y > 0.5, alpha * weight, (1 - alpha) * weight)
    pt = torch.where(weight > 0, 1.0 - (y - p).abs(), torch.ones_like(p))
    beta = (1 - pt) ** gamma
    mult = (weight.sum((-2, -1), keepdim=True) / (beta.sum((-2, -1), keepdim=True) + eps)).detach()
    loss = -a * beta * mult * torch.log(torch.clamp(pt + eps, max=1.0))
    return (loss * weight).sum((-2, -1)) / (weight.sum((-2, -1)) + eps)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, ignore: int = IGNORE) -> float:
    """IoU of a boolean prediction with the object (target == 1), ignore pixels left out (RITM ``get_iou``)."""
    keep = target != ignore
    obj = (target == 1) & keep
    pred = pred.bool() & keep
    union = (pred | obj).sum().item()
    return float((pred & obj).sum().item() / union) if union else float("nan")


# ---------------------------------------------------------------------------------------------------- the task
@register("interactive")
class InteractiveSegmentation(Task):
    dataset_kinds = ("instances",)
    fits_train_split = True
    dataset_hint = "an instance-mask dataset (grabcut, berkeley, davis_interactive with SBD training; sbd; " \
                   "coco_instances)"
    table = TableSpec(
        title="Interactive segmentation (SimpleClick-style, one click)",
        metrics=(Metric("iou1", "IoU@1"),),
        group_by=("backbone", "config.protocol.name", "config.task.decoder.hidden"),
        group_labels={"config.protocol.name": "protocol", "config.task.decoder.hidden": "decoder width"},
        paper={"dinov2_s14": "loftup_tables34"},
        position=32,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        task = cfg["task"]
        check_probe_cfg(task["probe"])
        for key, v in (("decoder.hidden", (task.get("decoder") or {}).get("hidden")),):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UpbenchError(f"task.{key}={v}: expected a positive integer")
        for key in ("click_radius", "threshold"):
            v = task.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or \
                    (key == "threshold" and v >= 1):
                raise UpbenchError(f"task.{key}={v}: expected a positive number" + (" below 1" if key == "threshold"
                                                                                    else ""))
        if task.get("backbone_scale", 1.0) != 1.0 or task.get("feature_grid"):
            raise UpbenchError("task=interactive adds the clicks to the backbone's patch embedding, so the backbone "
                               "sees the image at its own size: remove task.backbone_scale / task.feature_grid")
        if (task.get("cache") or {}).get("features"):
            raise UpbenchError("task=interactive: the backbone features depend on the click, so they cannot come from "
                               "the per-image feature cache; set task.cache.features=false")

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, device, train_set, val_set = job.pipe, job.device, job.train_set, job.val_set
        cfg, probe_cfg = job.cfg, job.cfg["probe"]
        bb = pipe.backbone
        if getattr(pipe.upsampler, "backbone_scale", 1.0) != 1.0:
            raise UpbenchError(f"upsampler={getattr(pipe.upsampler, 'registry_name', '?')} changes the backbone's input size; "
                               "task=interactive needs the backbone at the image's size")
        if not getattr(bb, "embed_channels", 0) or not getattr(bb, "embed_stride", 0):
            raise UpbenchError(f"backbone '{bb.name}' has no additive patch-token input (patch_bias); "
                               "task=interactive needs a timm ViT or the demo backbone")
        S = int(train_set.img_size)
        if S % int(bb.embed_stride):
            raise UpbenchError(f"dataset.img_size={S} is not a multiple of the backbone's embedding stride "
                               f"{bb.embed_stride}; choose e.g. dataset.img_size={S - S % int(bb.embed_stride)}")
        grid = (S // int(bb.patch_size), S // int(bb.patch_size))
        size = pipe.probe_size(grid, (S, S), cfg.get("resize_at", "features"))
        radius, threshold = float(cfg["click_radius"]), float(cfg["threshold"])
        encoder = ClickEncoder(int(bb.embed_channels), int(bb.embed_stride)).to(device)
        decoder = ConvDecoder(int(bb.channels), int(cfg["decoder"]["hidden"])).to(device)
        params = list(encoder.parameters()) + list(decoder.parameters())

        def forward(images: torch.Tensor, clicks: List[Optional[Tuple[int, int]]], grad: bool) -> torch.Tensor:
            maps = click_maps(clicks, (S, S), radius).to(device)
            feats, _ = pipe.encode_with_bias(images, encoder(maps), grad=grad)
            hr = pipe.upsample(images, feats, size, grad=grad)
            with pipe.autocast():
                logits = decoder(hr)
            return resize_prediction(logits.float(), (S, S))[:, 0]

        seed = int(job.seed)

        def batch_loss(items, flips, step):
            gen = np.random.default_rng([seed, step])
            masks = torch.stack([it["mask"].flip(-1) if f else it["mask"] for it, f in zip(items, flips)])
            images = torch.stack([it["image"].flip(-1) if f else it["image"] for it, f in zip(items, flips)])
            clicks = [training_click(m.numpy(), gen) for m in masks]
            logits = forward(images, clicks, grad=True)
            return normalized_focal_loss(logits, masks.to(device)).mean()

        encoder.train(), decoder.train()
        epoch_s, losses = train_probe(train_set, probe_cfg, params, job.seed, batch_loss, job.log,
                                      checkpoint=job.checkpoint, autocast=pipe.autocast, loader=pipe.loader)
        encoder.eval(), decoder.eval()
        ious: List[float] = []
        skipped = 0
        for item in bar(pipe.items(val_set), total=len(val_set), desc="evaluate"):
            mask = item["mask"]
            if not bool((mask == 1).any()):
                skipped += 1
                continue
            with torch.inference_mode():
                logits = forward(item["image"][None], [first_click(mask.numpy())], grad=False)
            iou = mask_iou(torch.sigmoid(logits[0]).cpu() > threshold, mask)
            if math.isfinite(iou):
                ious.append(iou)
        if not ious:
            raise RunFailed(f"interactive: no validation instance has an object pixel at dataset.img_size={S}; "
                            "check the masks and dataset.val_split")
        return {
            "metrics": {"iou1": 100.0 * sum(ious) / len(ious), "final_train_loss": losses[-1] if losses else None},
            "timing": {"probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)), "probe_epochs_s": epoch_s},
            "note": losses.note(probe_cfg["lr"]),
            "data": {"n_train": len(train_set), "n_val": len(val_set), "n_val_scored": len(ious),
                     "n_val_empty": skipped, "img_size": S, "decoder_size": list(size), "feature_grid": list(grid),
                     "click_radius": radius, "threshold": threshold, "features_cached": False},
            "artefacts": {"probe": save_head(job, nn.ModuleDict({"encoder": encoder, "decoder": decoder}),
                                             "interactive", hidden=int(cfg["decoder"]["hidden"]),
                                             decoder_size=list(size))},
        }
