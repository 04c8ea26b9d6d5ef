"""The probe loop shared by the probe tasks (seg, depth): AdamW, the three published LR schedules, shuffled batches
with random horizontal flips, and a per-epoch checkpoint so a requeued or re-run job resumes exactly."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from upbench.errors import UpbenchError
from upbench.files import atomic_write
from upbench.transforms import resize

LR_SCHEDULES = ("per_epoch", "per_iter_jafar", "per_iter_total", "constant")
OPTIMIZERS = ("adamw", "nadam", "adam")


def make_scheduler(optimizer: torch.optim.Optimizer, mode: str, epochs: int, iters_per_epoch: int):
    """Return (scheduler, step_per_iteration).

    per_epoch      -- cosine over ``epochs``, stepped once per epoch (the AnyUp correction; default)
    per_iter_jafar -- cosine with T_max=epochs stepped every iteration (the original JAFAR probe: the LR
                      oscillates with a period of 2*epochs iterations)
    per_iter_total -- cosine with T_max=epochs*iters stepped every iteration (NAF)
    constant       -- no schedule (LoftUp's probe)
    """
    if mode not in LR_SCHEDULES:
        raise UpbenchError(f"unknown probe.lr_schedule '{mode}'; valid: {', '.join(LR_SCHEDULES)}")
    if mode == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), False
    t_max = epochs * iters_per_epoch if mode == "per_iter_total" else epochs
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, t_max)), mode != "per_epoch"


def make_optimizer(params, probe_cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    """``probe.optimizer``: adamw (the JAFAR / NAF probes), nadam (LoftUp's) or adam (FeatUp's), with ``lr``,
    ``betas`` and ``weight_decay`` from the probe config."""
    name = str(probe_cfg.get("optimizer", "adamw")).lower()
    kwargs = dict(lr=float(probe_cfg["lr"]), betas=tuple(probe_cfg.get("betas", (0.9, 0.999))),
                  weight_decay=float(probe_cfg.get("weight_decay", 0.0)))
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "nadam":
        return torch.optim.NAdam(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    raise UpbenchError(f"unknown task.probe.optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def resize_prediction(pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A probe's (B, K, h, w) output at the target's size (the JAFAR probes resize bilinearly, no antialias)."""
    return resize(pred, (int(size[0]), int(size[1])), "bilinear")


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) integer labels (or label maps) at ``size`` with ``nearest`` (LoftUp / FeatUp's probe)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return resize(labels[:, None].float(), (int(size[0]), int(size[1])), "nearest")[:, 0].to(labels.dtype)


def save_head(job: Any, head: torch.nn.Module, kind: str, **meta: Any) -> Optional[str]:
    """The trained probe / head as ``<out_dir>/probe.safetensors`` (a few kB to MB), so predictions can be drawn
    later without retraining (``upbench viz predictions``); the metadata says how to rebuild it."""
    import json

    from safetensors.torch import save_file

    if job.out_dir is None:
        return None
    path = Path(job.out_dir) / "probe.safetensors"
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp),
                  metadata={"kind": kind, **{k: json.dumps(v) for k, v in meta.items()}})
    return str(path)


def load_head(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, metadata) of a head saved by :func:`save_head`."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = {k: (v if k == "kind" else json.loads(v)) for k, v in (fh.metadata() or {}).items()}
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except Exception as exc:  # noqa: BLE001  (missing, truncated or not a safetensors file)
        raise UpbenchError(f"cannot read the saved probe {path} ({type(exc).__name__}); re-run the job with "
                           "force=true to train it again") from None


def _save_probe_state(path: Path, state: Dict[str, Any]) -> None:
    with atomic_write(path) as tmp:   # a job killed while saving leaves the previous checkpoint intact
        torch.save(state, tmp)


def _load_probe_state(path: Path) -> Dict[str, Any]:
    try:   # tensors, numbers and lists only: nothing in it is unpickled as code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated, not ours, or holding objects)
        raise UpbenchError(f"cannot resume from the probe checkpoint {path} ({type(exc).__name__}); delete it to start "
                           "the probe afresh") from None


def train_probe(train_set, probe_cfg: Dict[str, Any], params, seed: int,
                loss_fn: Callable[[List[Dict[str, Any]], List[bool], int], torch.Tensor],
                log=print, checkpoint: Optional[Path] = None) -> Tuple[List[float], List[float]]:
    """The configured optimiser over ``params`` (AdamW by default), the LR schedule, shuffled batches with random
    horizontal flips;
    ``loss_fn(items, flips, step)`` gives a batch's loss.  Returns (seconds per epoch, mean loss per epoch).

    ``checkpoint``: a file written after every epoch (probe weights, optimiser, schedule, shuffling RNG); a run that
    finds it resumes after the last finished epoch with the same result as an uninterrupted run, which is how a
    requeued (preempted / timed-out) or re-run job continues."""
    params = list(params)
    gen = torch.Generator().manual_seed(int(seed))
    optim = make_optimizer(params, probe_cfg)
    batch_size, epochs = int(probe_cfg["batch_size"]), int(probe_cfg["epochs"])
    iters = (len(train_set) + batch_size - 1) // batch_size
    sched, per_iter = make_scheduler(optim, probe_cfg["lr_schedule"], epochs, iters)
    step, epoch_s, losses, start = 0, [], [], 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = _load_probe_state(ckpt)
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
