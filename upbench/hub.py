"""Weights from the Hugging Face hub or a local folder in the same layout, checked *before* any work starts.

``missing_weights`` looks every needed file up in the local folder or the hub cache and, unless offline, downloads
only those files; an offline machine learns in one line which components are missing instead of failing half-way
through a run, or after minutes of the hub client's retries (a quick TCP check of the endpoint comes first, and after
the first failure no further downloads are tried in this process)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UpbenchError

# component -> groups of files; a group is satisfied by any one of its alternatives (e.g. .safetensors or .bin)
Files = Dict[str, List[Tuple[str, ...]]]

# ------------------------------------------------------------------ the hub layouts upbench reads
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_REPO = "openai/clip-vit-large-patch14"   # torchmetrics' CLIPScore default
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


def sd15_vae_files(name_or_path: str) -> Files:
    """The files the SD1.5 VAE needs: in a pipeline folder (``vae/...``) or in the vae folder itself."""
    path = Path(str(name_or_path)).expanduser()
    prefix = "" if path.is_dir() and (path / "config.json").is_file() else "vae/"
    return {"vae": [(f"{prefix}config.json",), (f"{prefix}diffusion_pytorch_model.safetensors",
                                                 f"{prefix}diffusion_pytorch_model.bin")]}


def is_local(name_or_path: str) -> bool:
    return Path(os.path.expanduser(str(name_or_path))).exists() or str(name_or_path).startswith(("/", ".", "~"))


def _cached(repo: str, filename: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    return Path(hit) if isinstance(hit, str) else None


_hub_unreachable = False


def hub_answers(timeout: float = 5.0) -> bool:
    """A quick TCP check of the hub endpoint (behind a proxy the hub client itself decides)."""
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


def offline() -> bool:
    """Whether hub downloads are off: ``HF_HUB_OFFLINE=1``, or the endpoint did not answer once in this process (then
    the hub client is switched to offline mode, so no later call waits for its retries)."""
    global _hub_unreachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if not _hub_unreachable and hub_answers(timeout=3.0):
        return False
    _hub_unreachable = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return True


def offline_hint() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE") and not _hub_unreachable:
        return "HF_HUB_OFFLINE is set, so only cached files are used"
    return (f"the Hugging Face hub ({constants.ENDPOINT}) does not answer, so only cached files are used (set "
            "HF_HUB_OFFLINE=1 to skip the check)")


def _download(repo: str, filename: str) -> Optional[Path]:
    """Download one file into the hub cache; None if it cannot be had."""
    global _hub_unreachable
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if _hub_unreachable or not hub_answers():
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


def missing_message(what: str, name_or_path: str, missing: Sequence[str], key: str) -> str:
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
        raise UpbenchError(missing_message(what, name_or_path, missing or list(files), key))
    return root
