"""Semantic-segmentation linear probe (the JAFAR protocol): frozen backbone + frozen upsampler, a
``Conv2d(C, K, 1)`` probe trained with AdamW, CE ignoring 255; pixel accuracy (micro) and mIoU (macro)."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
from torch import nn
from torch.nn import functional as F

from . import register
from .common import FeatureSource, make_scheduler, resize_logits, timing_summary


@register("seg")
def run_seg(cfg: Dict[str, Any], backbone, upsampler, train_set, val_set, device: torch.device, cache,
            log=print) -> Dict[str, Any]:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    probe_cfg = cfg["probe"]
    num_classes, ignore = train_set.num_classes, train_set.ignore_index
    size = (train_set.img_size, train_set.img_size)
    budget = float(cfg["cache"]["upsampled_gb"])
    source = FeatureSource(backbone, upsampler, device, cache, train_set.img_size, cfg["guidance_norm"], budget)

    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    probe = nn.Conv2d(backbone.channels, num_classes, 1).to(device)
    optim = torch.optim.AdamW(probe.parameters(), lr=probe_cfg["lr"], betas=tuple(probe_cfg["betas"]),
                              weight_decay=probe_cfg["weight_decay"])
    batch_size, epochs = int(probe_cfg["batch_size"]), int(probe_cfg["epochs"])
    iters = (len(train_set) + batch_size - 1) // batch_size
    sched, per_iter = make_scheduler(optim, probe_cfg["lr_schedule"], epochs, iters)

    epoch_s, losses = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_set), generator=gen).tolist()
        flips = (torch.rand(len(order), generator=gen) < 0.5).tolist() if probe_cfg["flip"] else [False] * len(order)
        total = 0.0
        for b in range(iters):
            idx = order[b * batch_size:(b + 1) * batch_size]
            items = [train_set[i] for i in idx]
            feats = torch.stack([source.high_res(it, flips[i], size) for it, i in zip(items, idx)]).to(device)
            labels = torch.stack([it["label"].flip(-1) if flips[i] else it["label"] for it, i in zip(items, idx)])
            logits = resize_logits(probe(feats), labels.shape[-2:])
            loss = F.cross_entropy(logits, labels.to(device), ignore_index=ignore)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if per_iter:
                sched.step()
            total += loss.item()
        if not per_iter:
            sched.step()
        epoch_s.append(time.perf_counter() - t0)
        losses.append(total / max(1, iters))
        log(f"  epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} ({epoch_s[-1]:.2f}s)")

    miou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=ignore).to(device)
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=ignore).to(device)
    with torch.inference_mode():
        for i in range(len(val_set)):
            item = val_set[i]
            feats = source.high_res(item, False, (val_set.img_size, val_set.img_size))[None].to(device)
            label = item["label"][None].to(device)
            pred = resize_logits(probe(feats), label.shape[-2:]).argmax(1)
            miou.update(pred, label)
            acc.update(pred, label)
    return {
        "metrics": {"miou": float(miou.compute()) * 100, "acc": float(acc.compute()) * 100,
                    "final_train_loss": losses[-1] if losses else None},
        "timing": {"upsampler_ms": timing_summary(source.upsampler_s),
                   "backbone_ms": timing_summary(source.backbone_s),
                   "probe_epoch_s": sum(epoch_s) / max(1, len(epoch_s)),
                   "probe_epochs_s": epoch_s,
                   "upsampled_cached": source.caches_upsampled},
        "data": {"n_train": len(train_set), "n_val": len(val_set), "img_size": train_set.img_size,
                 "num_classes": num_classes},
    }
