"""Self-supervised training of a multi-step upsampler with UPLiFT's multi-depth loss (``upbench train``).

Image pyramid S, S/2, ..., S/2^D with frozen backbone features at every level.  For each depth d: the input is the
image and features at S/2^d, the upsampler runs d 2x steps, and step k is compared with the backbone features of
the image at S/2^(d-k); all terms are summed.  Adam, no schedule.  Checkpoints (model + optimiser + position) are
safetensors written atomically every ``save_every`` steps; a killed run resumes from the last one and, for a fixed
seed, ends with the same weights as an uninterrupted run (the data order is a function of (seed, epoch))."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch.nn import functional as F

from upbench.errors import RunFailed, UpbenchError
from upbench.files import atomic_write
from upbench.progress import bar as progress_bar
from upbench.protocols import Job, Task
from upbench.results import HASH_EXCLUDE, config_hash, train_weights_path
from upbench.transforms import resize

from . import register


#: training steps between host reads of the losses (and checks for divergence); state is saved only after a read
READ_EVERY = 20


def pyramid_sizes(img_size: int, patch: int, levels: int) -> List[int]:
    sizes = [img_size // 2 ** i for i in range(levels + 1)]
    if any(s * 2 ** i != img_size for i, s in enumerate(sizes)) or sizes[-1] % patch:
        raise UpbenchError(f"data.img_size={img_size} must be divisible by patch*2^{levels} = {patch * 2 ** levels} "
                           f"for depths up to {levels}")
    return sizes


def multi_depth_loss(model, images: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], depths: Sequence[int],
                     loss: str, guidance: Callable[[torch.Tensor], torch.Tensor],
                     input_noise: float = 0.0) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """``images[l]`` / ``feats[l]``: the batch ([0, 1] images) and its backbone features at S/2^l; ``guidance``
    normalises an image for the upsampler (:meth:`Pipeline.guidance`).  ``input_noise``: std of Gaussian noise
    added to each depth's input features (latent noise augmentation for VAE latents; targets stay clean).  Returns
    the total and each depth's term (detached 0-d tensors: read on the host only when logged)."""
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if loss == "l2":
            return F.mse_loss(a, b)
        if loss == "l1":
            return F.l1_loss(a, b)
        if loss == "cosine":
            return (1 - F.cosine_similarity(a, b, dim=1)).mean()
        raise UpbenchError(f"unknown train.loss '{loss}'; valid: l2, l1, cosine")

    total, per_depth = 0.0, {}
    for d in depths:
        guide = guidance(images[d])
        x = feats[d] + input_noise * torch.randn_like(feats[d]) if input_noise else feats[d]
        steps = model.forward_steps(guide, x, iters=d)
        term = sum(dist(step, feats[d - k]) for k, step in enumerate(steps, start=1))
        per_depth[d] = term.detach()
        total = total + term
    return total, per_depth


# ------------------------------------------------------------------ checkpoints (safetensors, atomic)
def save_state(path: Path, model, optim, meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for idx, state in optim.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})


def load_state(path: Path, model, optim) -> Dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except Exception as exc:  # noqa: BLE001  (truncated, not safetensors, another model's state)
        raise UpbenchError(f"cannot resume from {path} ({type(exc).__name__}): not a training state of this model; "
                           "delete it, or start afresh with train.resume=false") from None
    opt_sd = optim.state_dict()
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt_sd["state"] = state
    optim.load_state_dict(opt_sd)
    return meta


def save_weights(path: Path, model, meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


@register("train")
class MultiDepthTraining(Task):
    """``upbench train``: the job's upsampler is trained (not frozen); the result is a weights file, not a row."""

    makes_rows = False
    dataset_kinds = ("train_images",)
    dataset_hint = "training images (data.root=<image folder> or builtin:skimage)"

    def preflight(self, cfg: Dict[str, Any]) -> None:
        t = cfg["train"]
        lr = t.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UpbenchError(f"train.lr={lr}: expected a positive finite learning rate (e.g. train.lr=1e-3)")
        for key in ("batch_size", "epochs", "save_every"):
            v = t.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UpbenchError(f"train.{key}={v}: expected a positive integer")
        if t.get("max_steps") is not None and (not isinstance(t["max_steps"], int) or t["max_steps"] < 1):
            raise UpbenchError(f"train.max_steps={t['max_steps']}: expected a positive integer or null")
        depths = t.get("depths")
        if not isinstance(depths, list) or not depths or not all(isinstance(d, int) and d >= 1 for d in depths):
            raise UpbenchError(f"train.depths={depths}: expected a non-empty list of positive integers, e.g. [1,2,3]")
        if t.get("loss") not in ("l2", "l1", "cosine"):
            raise UpbenchError(f"unknown train.loss '{t.get('loss')}'; valid: l2, l1, cosine")

    def run(self, job: Job) -> Dict[str, Any]:
        cfg, pipe, device, log, data = job.full_cfg, job.pipe, job.device, job.log, job.train_set
        tcfg = cfg["train"]
        model = pipe.upsampler
        if not hasattr(model, "forward_steps"):
            raise UpbenchError(f"upsampler '{cfg['upsampler']['name']}' has no multi-step forward_steps(); "
                               "upbench train supports iterative upsamplers such as uplift")
        depths = sorted(int(d) for d in tcfg["depths"])
        sizes = pyramid_sizes(int(cfg["data"]["img_size"]), pipe.backbone.patch_size, max(depths))
        bs = int(tcfg["batch_size"])
        steps_per_epoch = math.ceil(len(data) / bs)
        total_steps = steps_per_epoch * int(tcfg["epochs"])
        if tcfg.get("max_steps"):
            total_steps = min(total_steps, int(tcfg["max_steps"]))

        out_dir = Path(job.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state_path = out_dir / "train_state.safetensors"
        ident = config_hash(cfg, exclude=HASH_EXCLUDE + ("device",))
        torch.manual_seed(job.seed)
        model.to(device).train()
        optim = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]))
        step, history = 0, []
        if tcfg.get("resume", True) and state_path.exists():
            meta = load_state(state_path, model, optim)
            if meta.get("config_hash") != ident:
                raise UpbenchError(f"{state_path} belongs to a different training config; use another train.out_dir "
                                   "or train.resume=false")
            step, history = int(meta["step"]), list(meta.get("history", []))
            log(f"resumed from step {step}/{total_steps} ({state_path})")

        source = getattr(data, "identity", "train_images")

        def pyramid(index: int, image: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
            img = image[None]
            images = [img if s == sizes[0] else resize(img, (s, s), antialias=True) for s in sizes]
            feats = [pipe.features(im[0], key=(source, index, s))[0][None] for im, s in zip(images, sizes)]
            return images, feats

        bar = progress_bar(total=total_steps, initial=step, desc="train", show=None if job.progress else False)
        t0 = time.perf_counter()
        pending: List[Tuple[int, torch.Tensor, Dict[int, torch.Tensor]]] = []

        def read_losses() -> None:
            """The steps since the last read: one host sync for all of them, then the divergence checks and the
            history, as if each step had been read on its own."""
            if not pending:
                return
            values = torch.stack([torch.stack([loss, *per.values()]).float() for _, loss, per in pending]).tolist()
            for (at, _, per), row in zip(pending, values):
                value, terms = row[0], dict(zip(per, row[1:]))
                if not math.isfinite(value):   # no weights from a diverged run (the last checkpoint stays)
                    raise RunFailed(f"training diverged: the loss became {value} at step {at} with "
                                    f"train.lr={tcfg['lr']}; lower train.lr")
                first = history[0]["loss"] if history else value
                if value > 1e3 * max(first, 1e-12) and at > 1:
                    raise RunFailed(f"training diverged: the loss grew from {first:.3g} to {value:.3g} by step "
                                    f"{at} with train.lr={tcfg['lr']}; lower train.lr")
                history.append({"step": at, "loss": value, **{f"d{d}": v for d, v in terms.items()}})
            bar.set_postfix({f"d{d}": f"{v:.4f}" for d, v in terms.items()})
            pending.clear()

        try:
            while step < total_steps:
                epoch, pos = divmod(step, steps_per_epoch)
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(job.seed * 100003 + epoch))
                batches = [order[p * bs:(p + 1) * bs].tolist()
                           for p in range(pos, min(steps_per_epoch, pos + total_steps - step))]
                # the rest of this epoch's images through the pipeline's loader (workers, pinned memory on a GPU)
                for idx, loaded in zip(batches, pipe.loader(data, batches)):
                    pairs = [pyramid(i, im) for i, im in zip(idx, loaded)]
                    images = [torch.cat([p[0][lvl] for p in pairs]).to(device) for lvl in range(len(sizes))]
                    feats = [torch.cat([p[1][lvl] for p in pairs]).to(device) for lvl in range(len(sizes))]
                    loss, per_depth = multi_depth_loss(model, images, feats, depths, tcfg["loss"], pipe.guidance,
                                                       float(tcfg.get("latent_noise") or 0.0))
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    optim.step()
                    step += 1
                    pending.append((step, loss.detach(), per_depth))
                    bar.update(1)
                    saving = step % int(tcfg["save_every"]) == 0 or step == total_steps
                    if saving or step % READ_EVERY == 0:   # losses stay on the device between reads
                        read_losses()
                    if saving:
                        save_state(state_path, model, optim,
                                   {"step": step, "config_hash": ident, "history": history})
        finally:   # a failure prints its message on a clean line
            bar.close()
        model.eval()
        final = train_weights_path(cfg)
        save_weights(final, model, {"steps": total_steps, "config_hash": ident, "backbone": cfg["backbone"]["name"],
                                    "in_channels": pipe.backbone.channels, "patch_size": pipe.backbone.patch_size,
                                    "upsampler_kwargs": cfg["upsampler"].get("kwargs") or {},
                                    "depths": depths})
        final.with_suffix(".log.json").write_text(json.dumps({"config": cfg, "history": history}, indent=1,
                                                             default=str))
        if not tcfg.get("keep_state", False):
            state_path.unlink(missing_ok=True)  # finished: the resumable state is no longer needed
        log(f"trained {total_steps} steps in {time.perf_counter() - t0:.1f}s (this run); weights: {final}")
        return {"weights": str(final), "steps": total_steps, "history": history}
