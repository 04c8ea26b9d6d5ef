"""Pieces shared by the probe tasks: normalisation, cached backbone features, timed upsampling, LR schedules."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from upbench.errors import UpbenchError
from upbench.files import atomic_write
from upbench.features import FeatureCache

LR_SCHEDULES = ("per_epoch", "per_iter_jafar", "per_iter_total")


def normalize(image01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(list(mean), dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=image01.dtype, device=image01.device).view(1, 3, 1, 1)
    return (image01 - m) / s


def make_scheduler(optimizer: torch.optim.Optimizer, mode: str, epochs: int, iters_per_epoch: int):
    """Return (scheduler, step_per_iteration).

    per_epoch      -- cosine over ``epochs``, stepped once per epoch (the AnyUp correction; default)
    per_iter_jafar -- cosine with T_max=epochs stepped every iteration (the original JAFAR probe: the LR
                      oscillates with a period of 2*epochs iterations)
    per_iter_total -- cosine with T_max=epochs*iters stepped every iteration (NAF)
    """
    if mode not in LR_SCHEDULES:
        raise UpbenchError(f"unknown probe.lr_schedule '{mode}'; valid: {', '.join(LR_SCHEDULES)}")
    t_max = epochs * iters_per_epoch if mode == "per_iter_total" else epochs
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max)), mode != "per_epoch"


class FeatureSource:
    """Backbone features (cached) and upsampled features (optionally cached in memory) for dataset items."""

    def __init__(self, backbone, upsampler, device: torch.device, cache: FeatureCache, img_size: int,
                 guidance_norm: str = "upsampler", upsampled_budget_gb: float = 0.0):
        self.backbone, self.upsampler, self.device, self.cache = backbone, upsampler, device, cache
        self.img_size = img_size
        if guidance_norm == "upsampler":
            self.guide_mean, self.guide_std = upsampler.image_mean, upsampler.image_std
        elif guidance_norm == "backbone":
            self.guide_mean, self.guide_std = backbone.mean, backbone.std
        else:
            raise UpbenchError(f"unknown guidance_norm '{guidance_norm}'; valid: upsampler, backbone")
        self.budget_bytes = upsampled_budget_gb * 2 ** 30
        self._hr: Dict[Tuple[str, bool], torch.Tensor] = {}
        self.backbone_s: List[float] = []
        self.upsampler_s: List[float] = []

    def low_res(self, item: Dict[str, Any], flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        image = item["image"].flip(-1) if flip else item["image"]

        def compute():
            t0 = time.perf_counter()
            with torch.inference_mode():
                x = normalize(image[None].to(self.device), self.backbone.mean, self.backbone.std)
                feats, prefix = self.backbone(x)
            self.backbone_s.append(time.perf_counter() - t0)
            return feats[0], prefix[0]

        key = (self.backbone.name, item["id"], self.img_size, flip)
        return self.cache.get(key, compute)

    def high_res(self, item: Dict[str, Any], flip: bool, output_size: Tuple[int, int]) -> torch.Tensor:
        key = (item["id"], flip)
        if key in self._hr:
            return self._hr[key]
        feats, _ = self.low_res(item, flip)
        image = item["image"].flip(-1) if flip else item["image"]
        with torch.inference_mode():
            guide = normalize(image[None].to(self.device), self.guide_mean, self.guide_std)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            hr = self.upsampler(guide, feats[None].to(self.device), output_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.upsampler_s.append(time.perf_counter() - t0)
        if tuple(hr.shape[-2:]) != tuple(output_size):
            raise UpbenchError(f"upsampler returned {tuple(hr.shape[-2:])}, expected {tuple(output_size)}")
        hr = hr[0].float()
        used = sum(t.numel() * 4 for t in self._hr.values())
        if used + hr.numel() * 4 <= self.budget_bytes:
            self._hr[key] = hr
        return hr

    @property
    def caches_upsampled(self) -> bool:
        return bool(self._hr)


def timing_summary(seconds: List[float]) -> Optional[float]:
    """Median in milliseconds (robust to the first, slower calls)."""
    if not seconds:
        return None
    return float(torch.tensor(seconds).median()) * 1e3


def resize_prediction(pred: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A probe's (B, K, h, w) output at the target's size (the JAFAR probes resize bilinearly)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)


def _save_probe_state(path: Path, state: Dict[str, Any]) -> None:
    with atomic_write(path) as tmp:   # a job killed while saving leaves the previous checkpoint intact
        torch.save(state, tmp)


def train_probe(train_set, probe_cfg: Dict[str, Any], params, seed: int,
                loss_fn: Callable[[List[Dict[str, Any]], List[bool], int], torch.Tensor],
                log=print, checkpoint: Optional[str] = None) -> Tuple[List[float], List[float]]:
    """The probe loop shared by the probe tasks: AdamW over ``params``, the configured LR schedule, shuffled batches
    with random horizontal flips; ``loss_fn(items, flips, step)`` gives a batch's loss.  Returns (seconds per
    epoch, mean loss per epoch).

    ``checkpoint``: a file written after every epoch (probe weights, optimiser, schedule, shuffling RNG); a run that
    finds it resumes after the last finished epoch with the same result as an uninterrupted run, which is how a
    requeued (preempted / timed-out) or re-run job continues."""
    params = list(params)
    gen = torch.Generator().manual_seed(int(seed))
    optim = torch.optim.AdamW(params, lr=probe_cfg["lr"], betas=tuple(probe_cfg["betas"]),
                              weight_decay=probe_cfg["weight_decay"])
    batch_size, epochs = int(probe_cfg["batch_size"]), int(probe_cfg["epochs"])
    iters = (len(train_set) + batch_size - 1) // batch_size
    sched, per_iter = make_scheduler(optim, probe_cfg["lr_schedule"], epochs, iters)
    step, epoch_s, losses, start = 0, [], [], 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, epoch_s, losses, start = state["step"], state["epoch_s"], state["losses"], state["epoch"]
        log(f"  resumed from {ckpt} after epoch {start}/{epochs}")
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_set), generator=gen).tolist()
        flips = (torch.rand(len(order), generator=gen) < 0.5).tolist() if probe_cfg["flip"] else [False] * len(order)
        total = 0.0
        for b in range(iters):
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = loss_fn([train_set[i] for i in idx], [flips[i] for i in idx], step)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if per_iter:
                sched.step()
            step += 1
            total += loss.item()
        if not per_iter:
            sched.step()
        epoch_s.append(time.perf_counter() - t0)
        losses.append(total / max(1, iters))
        log(f"  epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} ({epoch_s[-1]:.2f}s)")
        if ckpt is not None and epoch + 1 < epochs:
            _save_probe_state(ckpt, {"params": [p.detach().cpu() for p in params], "optim": optim.state_dict(),
                                     "sched": sched.state_dict(), "gen": gen.get_state(), "step": step,
                                     "epoch_s": epoch_s, "losses": losses, "epoch": epoch + 1})
    return epoch_s, losses
