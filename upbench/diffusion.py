"""Text-to-image generation with Stable Diffusion 1.5 (diffusers) and the CLIP score, for the upscaling task.

Weights come from the Hugging Face hub by name (downloaded into its cache when online) or from a local folder in
the same layout.  ``missing_weights`` checks every needed file *before* any work starts, so an offline machine is
told in one line which components are missing instead of failing half-way through a run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .dtypes import parse_dtype
from .errors import UpbenchError

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_REPO = "openai/clip-vit-large-patch14"   # torchmetrics' CLIPScore default

# component -> groups of files; a group is satisfied by any one of its alternatives (e.g. .safetensors or .bin)
Files = Dict[str, List[Tuple[str, ...]]]
SD_PIPELINE_FILES: Files = {
    "model_index": [("model_index.json",)],
    "unet": [("unet/config.json",), ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin")],
    "text_encoder": [("text_encoder/config.json",), ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin")],
    # the hub's SD1.5 ships vocab.json + merges.txt; transformers 5 saves one tokenizer.json instead
    "tokenizer": [("tokenizer/vocab.json", "tokenizer/tokenizer.json"), ("tokenizer/merges.txt", "tokenizer/tokenizer.json"),
                  ("tokenizer/tokenizer_config.json",)],
    "scheduler": [("scheduler/scheduler_config.json",)],
}
CLIP_FILES: Files = {
    "clip": [("config.json",), ("model.safetensors", "pytorch_model.bin"),
             ("preprocessor_config.json", "processor_config.json"), ("vocab.json", "tokenizer.json"),
             ("merges.txt", "tokenizer.json"), ("tokenizer_config.json",)],
}


def is_local(name_or_path: str) -> bool:
    return Path(os.path.expanduser(str(name_or_path))).exists() or str(name_or_path).startswith(("/", ".", "~"))


def _cached(repo: str, filename: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    return Path(hit) if isinstance(hit, str) else None


_hub_unreachable = False


def _hub_answers(timeout: float = 5.0) -> bool:
    """A quick TCP check of the hub endpoint, so that a machine without network is told at once instead of after
    the hub client's retries (behind a proxy the client itself decides)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(repo: str, filename: str) -> Optional[Path]:
    """Download one file into the hub cache; None if it cannot be had.  After the first failure that is not "no
    such file" the hub counts as unreachable for this process, so an offline check costs one round of retries,
    not one per file."""
    global _hub_unreachable
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if _hub_unreachable or not _hub_answers():
        _hub_unreachable = True
        return None
    try:
        return Path(hf_hub_download(repo, filename))
    except LocalEntryNotFoundError:  # (a subclass of the next) the hub could not be reached
        _hub_unreachable = True
        return None
    except EntryNotFoundError:
        return None
    except Exception:  # no network, no access, unknown repository: the caller reports what is still missing
        _hub_unreachable = True
        return None


def missing_weights(name_or_path: str, files: Files, download: bool = True) -> Tuple[List[str], Optional[Path]]:
    """(missing components, local root holding the files).  A hub name is looked up in the cache first and,
    unless offline, the missing files are downloaded (only those listed, not the whole repository)."""
    from huggingface_hub import constants

    local = is_local(name_or_path)
    root = Path(os.path.expanduser(str(name_or_path))) if local else None
    online = download and not local and not constants.HF_HUB_OFFLINE
    missing = []
    for component, groups in files.items():
        ok = True
        for group in groups:
            if local:
                found = next((root / f for f in group if (root / f).is_file()), None)
            else:
                found = next((p for p in (_cached(name_or_path, f) for f in group) if p), None)
                if found is None and online:
                    found = next((p for p in (_download(name_or_path, f) for f in group) if p), None)
                if found is not None and root is None:
                    root = found.parents[len(Path(group[0]).parts) - 1]   # the snapshot folder
            ok = ok and found is not None
        if not ok:
            missing.append(component)
    return missing, root


def _missing_message(what: str, name_or_path: str, missing: Sequence[str], key: str) -> str:
    if is_local(name_or_path):
        where, fetch = f"the local folder {name_or_path}", f"the files of {what}"
    else:
        where = f"'{name_or_path}' (not in the Hugging Face cache and not downloadable here: offline?)"
        fetch = f"them (huggingface-cli download {name_or_path})"
    return f"{what} weights missing: {', '.join(missing)} from {where}; download {fetch} where there is internet " \
           f"and set {key}=/local/folder"


def require_weights(what: str, name_or_path: str, files: Files, key: str) -> Path:
    missing, root = missing_weights(name_or_path, files)
    if missing or root is None:
        raise UpbenchError(_missing_message(what, name_or_path, missing or list(files), key))
    return root


def load_sd_pipeline(name_or_path: str, vae: torch.nn.Module, device: torch.device, dtype="float32",
                     scheduler: Optional[str] = None):
    """An SD1.5 ``StableDiffusionPipeline`` whose VAE is ``vae`` (the task's frozen backbone, loaded once);
    no safety checker.  ``scheduler``: a diffusers scheduler class name (e.g. ``DDIMScheduler``) or None."""
    try:
        import diffusers
        from diffusers import StableDiffusionPipeline
    except ImportError:
        raise UpbenchError("text-to-image needs diffusers and transformers: pip install 'upbench[gen]'") from None
    root = require_weights("SD1.5 text-to-image", name_or_path, SD_PIPELINE_FILES, "task.pipeline")
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


class ClipScore:
    """CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image, text), 0) per pair."""

    def __init__(self, name_or_path: str = CLIP_REPO, device: torch.device = torch.device("cpu")):
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:
            raise UpbenchError("the CLIP score needs transformers: pip install 'upbench[gen]'") from None
        root = require_weights("CLIP", name_or_path, CLIP_FILES, "task.clip_model")
        self.model = CLIPModel.from_pretrained(str(root)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(root))
        self.device = device

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns model outputs from get_*_features; older versions return the tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def __call__(self, images01: Sequence[torch.Tensor], prompts: Sequence[str]) -> List[float]:
        arrays = [np.asarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu()) for im in images01]
        inputs = self.processor(text=list(prompts), images=arrays, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = self._features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100.0 * cos.clamp(min=0)).tolist()
