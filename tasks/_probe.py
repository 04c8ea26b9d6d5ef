"""The probe loop shared by the probe tasks (seg, depth): AdamW, the three published LR schedules, shuffled batches
with random horizontal flips, and a per-epoch checkpoint so a requeued or re-run job resumes exactly."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from upbench.errors import RunFailed, UpbenchError
from upbench.files import atomic_write
from upbench.progress import bar
from upbench.transforms import resize

LR_SCHEDULES = ("per_epoch", "per_iter_jafar", "per_iter_total", "constant", "warmup_cosine")
OPTIMIZERS = ("adamw", "nadam", "adam")
#: a loss this many times its first value means the probe diverged
DIVERGED = 10.0
#: with at least this many steps, a loss that fell by less than 5% means the probe did not learn
JUDGE_STEPS = 20


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_probe_cfg(probe: Dict[str, Any], where: str = "task.probe") -> None:
    """The probe's settings, checked before anything is built (one line naming the bad key)."""
    lr = probe.get("lr")
    if not _number(lr) or lr <= 0:
        raise UpbenchError(f"{where}.lr={lr}: expected a positive finite learning rate (e.g. {where}.lr=5e-4)")
    for key in ("epochs", "batch_size"):
        v = probe.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UpbenchError(f"{where}.{key}={v}: expected a positive integer")
    wd = probe.get("weight_decay", 0.0)
    if not _number(wd) or wd < 0:
        raise UpbenchError(f"{where}.weight_decay={wd}: expected a finite number >= 0")
    betas = probe.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise UpbenchError(f"{where}.betas={betas}: expected two numbers in [0, 1), e.g. {where}.betas=[0.9,0.999]")
    if str(probe.get("optimizer", "adamw")).lower() not in OPTIMIZERS:
        raise UpbenchError(f"unknown {where}.optimizer '{probe.get('optimizer')}'; valid: {', '.join(OPTIMIZERS)}")
    if probe.get("lr_schedule") not in LR_SCHEDULES:
        raise UpbenchError(f"unknown {where}.lr_schedule '{probe.get('lr_schedule')}'; valid: "
                           f"{', '.join(LR_SCHEDULES)}")


class LossHistory(list):
    """The mean loss of every epoch, plus the mean of the first steps' losses (what divergence and progress are
    judged against) and the number of steps taken."""

    HEAD = 10   # steps averaged into ``first``

    def __init__(self, values=(), head: Sequence[float] = (), steps: int = 0):
        super().__init__(values)
        self.head = list(head)
        self.steps = steps

    @property
    def initial(self) -> Optional[float]:
        """The first step's loss: the untrained probe's."""
        return self.head[0] if self.head else None

    @property
    def first(self) -> Optional[float]:
        return sum(self.head) / len(self.head) if self.head else None

    def record(self, value: float) -> None:
        if len(self.head) < self.HEAD:
            self.head.append(value)

    def note(self, lr: Any) -> Optional[str]:
        """A hint for the row when the probe did not learn: its numbers are not converged."""
        if self.first is None or not self or self.steps < JUDGE_STEPS or self[-1] < 0.95 * self.first:
            return None
        if self[-1] > self.first:
            return (f"the probe's loss rose ({self.first:.3g} -> {self[-1]:.3g} over {self.steps} steps): "
                    f"task.probe.lr={lr} is probably too large; these numbers are not a trained probe's")
        return (f"the probe's loss barely moved ({self.first:.3g} -> {self[-1]:.3g} over {self.steps} steps): "
                f"task.probe.lr={lr} may be too small for so few steps; these numbers are not converged")


def warmup_cosine_factor(step: int, max_step: int, warmup_step: float, min_factor: float = 0.01) -> float:
    """Probe3D's ``cosine_decay_linear_warmup``: linear from ``min_factor`` to 1 over the warm-up, then a quarter
    cosine down to ``min_factor`` at ``max_step``."""
    span = 1.0 - min_factor
    if step <= warmup_step:
        return span * (step / max(warmup_step, 1e-12)) + min_factor
    rel = (step - warmup_step) / max(max_step - warmup_step, 1e-12)
    return span * math.cos(0.5 * rel * math.pi) + min_factor


def make_scheduler(optimizer: torch.optim.Optimizer, mode: str, epochs: int, iters_per_epoch: int,
                   warmup_epochs: float = 0.0):
    """Return (scheduler, step_per_iteration).

    per_epoch      -- cosine over ``epochs``, stepped once per epoch (the AnyUp correction; default)
    per_iter_jafar -- cosine with T_max=epochs stepped every iteration (the original JAFAR probe: the LR
                      oscillates with a period of 2*epochs iterations)
    per_iter_total -- cosine with T_max=epochs*iters stepped every iteration (NAF)
    constant       -- no schedule (LoftUp's probe)
    warmup_cosine  -- Probe3D's: linear warm-up over ``warmup_epochs``, then a quarter cosine, every iteration
    """
    if mode not in LR_SCHEDULES:
        raise UpbenchError(f"unknown probe.lr_schedule '{mode}'; valid: {', '.join(LR_SCHEDULES)}")
    if mode == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), False
    if mode == "warmup_cosine":
        total, warm = epochs * iters_per_epoch, float(warmup_epochs) * iters_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total, warm)), True
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
                log=print, checkpoint: Optional[Path] = None,
                autocast: Callable[[], Any] = contextlib.nullcontext,
                loader: Optional[Callable[[Any, List[List[int]]], Any]] = None) -> Tuple[List[float], List[float]]:
    """The configured optimiser over ``params`` (AdamW by default), the LR schedule, shuffled batches with random
    horizontal flips;
    ``loss_fn(items, flips, step)`` gives a batch's loss.  Returns (seconds per epoch, mean loss per epoch).

    ``checkpoint``: a file written after every epoch (probe weights, optimiser, schedule, shuffling RNG); a run that
    finds it resumes after the last finished epoch with the same result as an uninterrupted run, which is how a
    requeued (preempted / timed-out) or re-run job continues.  ``autocast``: the context the loss is computed in
    (the pipeline's ``compute_dtype``).  ``loader(dataset, batches)``: yields each batch's items (the pipeline's
    :meth:`~upbench.pipeline.Pipeline.loader`, with its workers and pinned memory); default: indexing in this
    process.  Step losses stay on the device and are read once per epoch (one host sync per epoch, not per step)."""
    params = list(params)
    gen = torch.Generator().manual_seed(int(seed))
    optim = make_optimizer(params, probe_cfg)
    batch_size, epochs = int(probe_cfg["batch_size"]), int(probe_cfg["epochs"])
    iters = (len(train_set) + batch_size - 1) // batch_size
    sched, per_iter = make_scheduler(optim, probe_cfg["lr_schedule"], epochs, iters,
                                     float(probe_cfg.get("warmup_epochs", 0.0) or 0.0))
    step, epoch_s, losses, start = 0, [], LossHistory(), 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = _load_probe_state(ckpt)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, epoch_s, start = state["step"], state["epoch_s"], state["epoch"]
        losses = LossHistory(state["losses"], state.get("head_losses") or (), step)
        log(f"  resumed from {ckpt} after epoch {start}/{epochs}")
    lr = probe_cfg["lr"]
    progress = bar(total=epochs * iters, initial=step, desc="probe")
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            order = torch.randperm(len(train_set), generator=gen).tolist()
            flips = ((torch.rand(len(order), generator=gen) < 0.5).tolist() if probe_cfg["flip"]
                     else [False] * len(order))
            pending = []
            batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(iters)]
            loaded = loader(train_set, batches) if loader is not None else ([train_set[i] for i in idx]
                                                                             for idx in batches)
            for b, (idx, items) in enumerate(zip(batches, loaded)):
                with autocast():
                    loss = loss_fn(items, [flips[i] for i in idx], step + b)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                if per_iter:
                    sched.step()
                pending.append(loss.detach().float())
                progress.update(1)
            values = torch.stack(pending).tolist() if pending else []   # the epoch's one host sync
            for value in values:
                step += 1
                if not math.isfinite(value):
                    raise RunFailed(f"the probe diverged: its loss became {value} at step {step} (epoch "
                                    f"{epoch + 1}) with task.probe.lr={lr}; lower task.probe.lr")
                losses.record(value)
            total = sum(values)
            if values:
                progress.set_postfix(epoch=epoch + 1, loss=f"{values[-1]:.4f}", refresh=False)
            if not per_iter:
                sched.step()
            epoch_s.append(time.perf_counter() - t0)
            losses.append(total / max(1, iters))
            losses.steps = step
            log(f"  epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} ({epoch_s[-1]:.2f}s)")
            if losses.initial and losses[-1] > DIVERGED * abs(losses.initial):
                raise RunFailed(f"the probe diverged: its loss grew from {losses.initial:.3g} to {losses[-1]:.3g} by "
                                f"epoch {epoch + 1} with task.probe.lr={lr}; lower task.probe.lr")
            if ckpt is not None and epoch + 1 < epochs:
                _save_probe_state(ckpt, {"params": [p.detach().cpu() for p in params], "optim": optim.state_dict(),
                                         "sched": sched.state_dict(), "gen": gen.get_state(), "step": step,
                                         "epoch_s": epoch_s, "losses": list(losses), "head_losses": list(losses.head),
                                         "epoch": epoch + 1})
    finally:   # a failure prints its message on a clean line
        progress.close()
    return epoch_s, losses
