"""Text-to-image upscaling (UPLiFT Tables 2-3): Stable Diffusion 1.5 generates every prompt at ``base_size``; its
latents are upsampled ``factor`` x by the upsampler (guidance: the decoded base image), decoded by the VAE
backbone at ``base_size * factor`` and colour-corrected against the base image.  Metrics over the set: FID and
patch-FID against the prompts' real images, and the CLIP score; the same for the base images (the "SD1.5 at 512"
row of the tables)."""
from __future__ import annotations

import time
from typing import Any, Dict, List

import torch

from upbench import diffusion, image_metrics
from upbench.errors import UpbenchError

from . import register
from .common import normalize, timing_summary


def preflight(cfg: Dict[str, Any]) -> None:
    """Before anything is built: every weight the run needs (VAE, SD1.5 UNet / text encoder / tokenizer /
    scheduler, CLIP), checked and reported together in one line."""
    from upbench.vae import sd15_weight_files

    task, bb = cfg["task"], cfg["backbone"]
    if bb.get("kind") != "vae" or bb.get("vae") != "sd15":
        raise UpbenchError(f"task=t2i_upscale needs the SD1.5 VAE as its backbone (backbone=sd15_vae), "
                           f"got backbone={bb.get('name')}")
    vae = bb.get("name_or_path") or diffusion.SD15_REPO
    checks = [("VAE", vae, sd15_weight_files(vae), "backbone.name_or_path"),
              ("SD1.5 text-to-image", task["pipeline"], diffusion.SD_PIPELINE_FILES, "task.pipeline")]
    if task.get("clip_model"):
        checks.append(("CLIP", task["clip_model"], diffusion.CLIP_FILES, "task.clip_model"))
    problems = []
    for what, where, files, key in checks:
        missing, _ = diffusion.missing_weights(where, files)
        if missing:
            problems.append(f"{what} ({', '.join(missing)}) from {where} [set {key}=/local/folder]")
    if problems:
        raise UpbenchError("t2i_upscale: weights missing: " + "; ".join(problems) + "; they cannot be downloaded "
                           "here (offline?): fetch them with huggingface-cli download where there is internet"
                           + (" (task.clip_model=null skips the CLIP score)" if task.get("clip_model") else ""))


@register("t2i_upscale", preflight=preflight)
def run_t2i_upscale(cfg: Dict[str, Any], backbone, upsampler, train_set, val_set, device: torch.device, cache,
                    log=print) -> Dict[str, Any]:
    if getattr(val_set, "kind", None) != "prompts":
        raise UpbenchError("task=t2i_upscale needs a prompt set (dataset=coco_captions, relaion, image_captions, "
                           "prompt_file or demo_prompts)")
    pipeline_vae = getattr(getattr(backbone, "vae", None), "pipeline_vae", None)
    if pipeline_vae is None:
        raise UpbenchError("task=t2i_upscale needs the SD1.5 VAE as its backbone (backbone=sd15_vae)")
    with_fid = bool(cfg["fid"])
    if with_fid and not getattr(val_set, "has_references", False):
        raise UpbenchError(f"t2i_upscale: dataset '{val_set.name}' has no reference images for FID; "
                           f"use a set with images (coco_captions, relaion) or task.fid=false")
    base, factor, bs = int(cfg["base_size"]), int(cfg["factor"]), int(cfg["batch_size"])
    pipe = diffusion.load_sd_pipeline(cfg["pipeline"], pipeline_vae, device, cfg.get("dtype", "float32"),
                                      cfg.get("scheduler"))
    clip = diffusion.ClipScore(cfg["clip_model"], device) if cfg.get("clip_model") else None
    patch = int(cfg["pfid_patch"])
    # whole-image and patch statistics per image set; the base images' patches cover the same area at 1/factor
    stats = {(name, patched): image_metrics.FeatureStats((patch // scale) if patched else 0)
             for name, scale in (("real", 1), ("up", 1), ("base", factor)) for patched in (False, True)
             } if with_fid else {}
    clip_up: List[float] = []
    clip_base: List[float] = []
    gen_s: List[float] = []
    up_s: List[float] = []
    dec_s: List[float] = []
    seed = int(cfg.get("seed", 0))
    for start in range(0, len(val_set), bs):
        items = [val_set[i] for i in range(start, min(start + bs, len(val_set)))]
        prompts = [it["prompt"] for it in items]
        with torch.inference_mode():
            t0 = time.perf_counter()
            # one generator per prompt: an image does not depend on the batch it was generated in
            gens = [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(len(items))]
            z = pipe(prompts, height=base, width=base, num_inference_steps=int(cfg["steps"]),
                     guidance_scale=float(cfg["guidance_scale"]), negative_prompt=cfg.get("negative_prompt"),
                     generator=gens, output_type="latent").images
            gen_s.append((time.perf_counter() - t0) / len(items))
            low = backbone.decode(z).clamp(0, 1)
            guide = normalize(low, upsampler.image_mean, upsampler.image_std)
            t0 = time.perf_counter()
            zu = upsampler(guide, z, (z.shape[-2] * factor, z.shape[-1] * factor))
            up_s.append((time.perf_counter() - t0) / len(items))
            t0 = time.perf_counter()
            high = backbone.decode(zu).clamp(0, 1)
            dec_s.append((time.perf_counter() - t0) / len(items))
            if cfg["color_correction"]:
                high = image_metrics.color_correct(high, low)
        if high.shape[-1] != base * factor:
            raise UpbenchError(f"t2i_upscale: decoded size {tuple(high.shape[-2:])} != {base * factor}")
        if with_fid:
            batch = {"real": [it["image"] for it in items], "up": list(high.cpu()), "base": list(low.cpu())}
            for (name, _), feature_stats in stats.items():
                feature_stats.update(batch[name])
        if clip is not None:
            clip_up += clip(list(high), prompts)
            clip_base += clip(list(low), prompts)
        log(f"  {start + len(items)}/{len(val_set)} prompts")
    metrics: Dict[str, Any] = {}
    if with_fid:
        for name, suffix in (("up", ""), ("base", "_base")):
            for patched, metric in ((False, "fid"), (True, "pfid")):
                metrics[metric + suffix] = image_metrics.frechet_distance(stats[("real", patched)],
                                                                          stats[(name, patched)])
    if clip is not None:
        metrics.update(clip=sum(clip_up) / len(clip_up), clip_base=sum(clip_base) / len(clip_base))
    return {
        "metrics": metrics,
        "timing": {"upsampler_ms": timing_summary(up_s), "decode_ms": timing_summary(dec_s),
                   "generate_ms": timing_summary(gen_s)},
        "data": {"n_prompts": len(val_set), "base_size": base, "out_size": base * factor, "factor": factor,
                 "steps": int(cfg["steps"]), "guidance_scale": float(cfg["guidance_scale"]),
                 "scheduler": cfg.get("scheduler") or type(pipe.scheduler).__name__,
                 "reference_size": getattr(val_set, "reference_size", None),
                 "fid_resize": image_metrics.FID_RESIZE_MODE if with_fid else None,
                 "pfid_patch": patch if with_fid else None, "clip_model": cfg.get("clip_model"),
                 "color_correction": bool(cfg["color_correction"])},
    }
