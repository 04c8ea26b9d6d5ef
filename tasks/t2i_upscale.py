"""Text-to-image upscaling (UPLiFT Tables 2-3): Stable Diffusion 1.5 generates every prompt at ``base_size``; its
latents are upsampled ``factor`` x by the upsampler (guidance: the decoded base image), decoded by the VAE
backbone at ``base_size * factor`` and colour-corrected against the base image.  Metrics over the set: FID and
patch-FID against the prompts' real images, and the CLIP score; the same for the base images (the "SD1.5 at 512"
row of the tables)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch

from upbench import hub, image_metrics
from upbench.progress import bar
from upbench.dtypes import parse_dtype
from upbench.errors import UpbenchError
from upbench.protocols import Job, Metric, TableSpec, Task
from upbench.timing import Stopwatch, median_ms

from . import register


def load_sd_pipeline(name_or_path: str, vae: torch.nn.Module, device: torch.device, dtype="float32",
                     scheduler: Optional[str] = None):
    """An SD1.5 ``StableDiffusionPipeline`` whose VAE is ``vae`` (the task's frozen backbone, loaded once);
    no safety checker.  ``scheduler``: a diffusers scheduler class name (e.g. ``DDIMScheduler``) or None."""
    try:
        import diffusers
        from diffusers import StableDiffusionPipeline
    except ImportError:
        raise UpbenchError("text-to-image needs diffusers and transformers: pip install 'upbench[gen]'") from None
    root = hub.require_weights("SD1.5 text-to-image", name_or_path, hub.SD_PIPELINE_FILES, "task.pipeline")
    torch_dtype = parse_dtype(dtype, "task.dtype")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(root), vae=vae, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        # float32 is the default: not passing it keeps older and newer diffusers (torch_dtype vs dtype) quiet
        **({} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}))
    if scheduler:
        cls = getattr(diffusers, str(scheduler), None)
        if cls is None or not hasattr(cls, "from_config"):
            raise UpbenchError(f"unknown scheduler '{scheduler}'; use a diffusers scheduler class name, "
                               f"e.g. DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@register("t2i_upscale")
class TextToImageUpscale(Task):
    dataset_kinds = ("prompts",)
    dataset_hint = "a prompt set (dataset=coco_captions, relaion, image_captions, prompt_file or demo_prompts)"
    table = TableSpec(
        title="Text-to-image upscaling",
        metrics=(Metric("fid", "FID", "min"), Metric("pfid", "p-FID", "min"), Metric("clip", "CLIP", "max")),
        group_by=("backbone", "data.base_size", "data.out_size", "config.protocol.name"),
        group_labels={"backbone": "VAE", "data.base_size": "base px", "data.out_size": "output px",
                      "config.protocol.name": "protocol"},
        paper={"sd15_vae": "table2_3"},
        baseline=("no upscaling ({base_size} px)", "_base"),
        position=40,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        """Before anything is built: every weight the run needs (VAE, SD1.5 UNet / text encoder / tokenizer /
        scheduler, CLIP), checked and reported together in one line."""
        task, bb = cfg["task"], cfg["backbone"]
        if bb.get("kind") != "vae" or bb.get("vae") != "sd15":
            raise UpbenchError(f"task=t2i_upscale needs the SD1.5 VAE as its backbone (backbone=sd15_vae), "
                               f"got backbone={bb.get('name')}")
        vae = bb.get("name_or_path") or hub.SD15_REPO
        checks = [("VAE", vae, hub.sd15_vae_files(vae), "backbone.name_or_path"),
                  ("SD1.5 text-to-image", task["pipeline"], hub.SD_PIPELINE_FILES, "task.pipeline")]
        if task.get("clip_model"):
            checks.append(("CLIP", task["clip_model"], hub.CLIP_FILES, "task.clip_model"))
        problems = []
        for what, where, files, key in checks:
            missing, _ = hub.missing_weights(where, files)
            if missing:
                problems.append(f"{what} ({', '.join(missing)}) from {where} [set {key}=/local/folder]")
        if problems:
            raise UpbenchError("t2i_upscale: weights missing: " + "; ".join(problems) + "; they cannot be downloaded "
                               "here (offline?): fetch them with huggingface-cli download where there is internet"
                               + (" (task.clip_model=null skips the CLIP score)" if task.get("clip_model") else ""))

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, cfg, val_set, device = job.pipe, job.cfg, job.val_set, job.device
        pipeline_vae = getattr(getattr(pipe.backbone, "vae", None), "pipeline_vae", None)
        if pipeline_vae is None:
            raise UpbenchError("task=t2i_upscale needs the SD1.5 VAE as its backbone (backbone=sd15_vae)")
        with_fid = bool(cfg["fid"])
        if with_fid and not getattr(val_set, "has_references", False):
            raise UpbenchError(f"t2i_upscale: dataset '{val_set.name}' has no reference images for FID; "
                               f"use a set with images (coco_captions, relaion) or task.fid=false")
        base, factor, bs = int(cfg["base_size"]), int(cfg["factor"]), int(cfg["batch_size"])
        sd = load_sd_pipeline(cfg["pipeline"], pipeline_vae, device, cfg.get("dtype", "float32"), cfg.get("scheduler"))
        clip = image_metrics.ClipScore(cfg["clip_model"], device) if cfg.get("clip_model") else None
        patch = int(cfg["pfid_patch"])
        # whole-image and patch statistics per image set; the base images' patches cover the same area at 1/factor
        stats = {(name, patched): image_metrics.FeatureStats((patch // scale) if patched else 0, device=device)
                 for name, scale in (("real", 1), ("up", 1), ("base", factor)) for patched in (False, True)
                 } if with_fid else {}
        clip_up: List[float] = []
        clip_base: List[float] = []
        gen_s: List[float] = []
        dec_s: List[float] = []
        for start in bar(range(0, len(val_set), bs), desc="prompts"):
            items = [val_set[i] for i in range(start, min(start + bs, len(val_set)))]
            prompts = [it["prompt"] for it in items]
            with torch.inference_mode():
                with Stopwatch(device) as sw:
                    # one generator per prompt: an image does not depend on the batch it was generated in
                    gens = [torch.Generator(device="cpu").manual_seed(job.seed + start + j) for j in range(len(items))]
                    z = sd(prompts, height=base, width=base, num_inference_steps=int(cfg["steps"]),
                           guidance_scale=float(cfg["guidance_scale"]), negative_prompt=cfg.get("negative_prompt"),
                           generator=gens, output_type="latent").images
                gen_s.append(sw.seconds / len(items))
                low = pipe.decode(z).clamp(0, 1)
                zu = pipe.upsample(low, z, (z.shape[-2] * factor, z.shape[-1] * factor))
                with Stopwatch(device) as sw:
                    high = pipe.decode(zu).clamp(0, 1)
                dec_s.append(sw.seconds / len(items))
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
            job.log(f"  {start + len(items)}/{len(val_set)} prompts")
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
            "timing": {"decode_ms": median_ms(dec_s), "generate_ms": median_ms(gen_s)},
            "data": {"n_prompts": len(val_set), "base_size": base, "out_size": base * factor, "factor": factor,
                     "steps": int(cfg["steps"]), "guidance_scale": float(cfg["guidance_scale"]),
                     "scheduler": cfg.get("scheduler") or type(sd.scheduler).__name__,
                     "reference_size": getattr(val_set, "reference_size", None),
                     "fid_resize": image_metrics.FID_RESIZE_MODE if with_fid else None,
                     "pfid_patch": patch if with_fid else None, "clip_model": cfg.get("clip_model"),
                     "color_correction": bool(cfg["color_correction"])},
        }
