"""Semantic-segmentation linear probe (the JAFAR protocol): frozen backbone + frozen upsampler, a
``Conv2d(C, K, 1)`` probe trained with AdamW, CE ignoring 255; pixel accuracy (micro) and mIoU (macro)."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, TableSpec, Task

from . import register
from ._probe import check_probe_cfg, load_head, resize_labels, resize_prediction, save_head, train_probe
from ._seg_metrics import ConfusionMatrix

RESIZE_AT = ("features", "logits", "labels")


@register("seg")
class SegProbe(Task):
    dataset_kinds = ("seg",)
    fits_train_split = True
    dataset_hint = "a segmentation dataset (voc, ade20k, cityscapes, cocostuff, demo)"
    table = TableSpec(
        title="Segmentation linear probes",
        metrics=(Metric("miou", "mIoU"), Metric("acc", "Acc")),
        group_by=("backbone", "config.protocol.name", "config.task.probe.lr_schedule", "config.task.resize_at"),
        group_labels={"config.protocol.name": "protocol"},
        paper={"dinov2_s14": "table1", "dinov3_splus16": "table8"},
        position=10,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        check_probe_cfg(cfg["task"]["probe"])
        if cfg["task"].get("resize_at", "features") not in RESIZE_AT:
            raise UpbenchError(f"unknown task.resize_at '{cfg['task'].get('resize_at')}'; valid: {', '.join(RESIZE_AT)}")

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, device, train_set, val_set = job.pipe, job.device, job.train_set, job.val_set
        probe_cfg = job.cfg["probe"]
        num_classes, ignore = train_set.num_classes, train_set.ignore_index
        resize_at = job.cfg.get("resize_at", "features")
        grid = tuple(pipe.item_features(train_set[0])[0].shape[-2:])
        size = pipe.probe_size(grid, (train_set.img_size, train_set.img_size), resize_at)
        probe = nn.Conv2d(pipe.backbone.channels, num_classes, 1).to(device)

        def batch_loss(items, flips, _step):
            feats = torch.stack([pipe.item_upsampled(it, f, size) for it, f in zip(items, flips)]).to(device)
            labels = torch.stack([it["label"].flip(-1) if f else it["label"] for it, f in zip(items, flips)])
            logits = probe(feats)
            if resize_at == "labels":   # LoftUp / FeatUp: the labels come to the prediction's size (nearest)
                labels = resize_labels(labels, logits.shape[-2:])
            else:
                logits = resize_prediction(logits, labels.shape[-2:])
            return F.cross_entropy(logits, labels.to(device), ignore_index=ignore)

        epoch_s, losses = train_probe(train_set, probe_cfg, probe.parameters(), job.seed, batch_loss, job.log,
                                      checkpoint=job.checkpoint, autocast=pipe.autocast, loader=pipe.loader)

        scores = ConfusionMatrix(num_classes, ignore, device)
        with torch.inference_mode(), pipe.autocast():
            for item in bar(pipe.items(val_set), total=len(val_set), desc="evaluate"):
                feats = pipe.item_upsampled(item, False, size)[None].to(device)
                label = item["label"][None].to(device)
                if resize_at == "labels":   # the argmax comes to the labels' size (nearest)
                    pred = resize_labels(probe(feats).argmax(1), label.shape[-2:])
                else:
                    pred = resize_prediction(probe(feats), label.shape[-2:]).argmax(1)
                scores.update(pred, label)
        support = scores.support().cpu()
        if int(support.sum()) == 0:   # nothing to score: no mIoU, not a 0 (or NaN) one
            raise RunFailed(f"{getattr(val_set, 'name', 'the dataset')}: the validation labels have no labelled pixel "
                            "(all ignore); check the label files and dataset.val_split")
        ious = scores.iou().float().cpu() * 100
        names = list(getattr(train_set, "class_names", ()) or [str(k) for k in range(num_classes)])
        return {
            "metrics": {"miou": scores.miou() * 100, "acc": scores.accuracy() * 100,
                        "final_train_loss": losses[-1] if losses else None,
                        # classes with no pixel in the validation labels have no IoU (None), not 0
                        "per_class_iou": [float(v) if n > 0 else None for v, n in zip(ious.tolist(), support.tolist())]},
            "timing": {"probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)), "probe_epochs_s": epoch_s},
            "note": losses.note(probe_cfg["lr"]),
            "data": {"n_train": len(train_set), "n_val": len(val_set), "img_size": train_set.img_size,
                     "probe_size": list(size), "feature_grid": list(grid),
                     "num_classes": num_classes, "class_names": names,
                     "val_pixels_per_class": support.tolist()},
            "artefacts": {"probe": save_head(job, probe, "seg", num_classes=num_classes, probe_size=list(size))},
        }

    def predict(self, pipe, head_path: str, items, size) -> list:
        """Label maps (H, W) of ``items`` from the probe a finished run saved."""
        state, meta = load_head(head_path)
        probe = nn.Conv2d(pipe.backbone.channels, int(meta["num_classes"]), 1)
        probe.load_state_dict(state)
        probe = probe.to(pipe.device).eval()
        probe_size = tuple(meta.get("probe_size") or size)
        out = []
        with torch.inference_mode():
            for item in items:
                feats = pipe.item_upsampled(item, False, probe_size)[None].to(pipe.device)
                out.append(resize_prediction(probe(feats), item["label"].shape[-2:]).argmax(1)[0].cpu())
        return out
