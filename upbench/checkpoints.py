"""Official weights: resolve a name (HF hub / URL) or a local path, read it safely, unwrap and strip prefixes,
and load strictly with a report of missing and unexpected keys."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

from .errors import UpbenchError

WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model", "module", "net", "params")


@dataclass(frozen=True)
class WeightSource:
    """Where an official checkpoint lives: a Hugging Face file (``hf_repo`` + ``hf_file``) or a plain ``url``."""

    hf_repo: Optional[str] = None
    hf_file: Optional[str] = None
    url: Optional[str] = None
    package_file: Optional[str] = None   # shipped inside upbench/assets (no download)
    licence: str = ""
    notes: str = ""

    def describe(self) -> str:
        if self.package_file:
            return f"upbench/assets/{self.package_file}"
        if self.hf_repo:
            return f"hf://{self.hf_repo}/{self.hf_file}"
        return self.url or "?"


def download(source: WeightSource, what: str) -> str:
    """Fetch an official file into the usual caches (HF hub cache / torch hub cache); clear error offline."""
    if source.package_file:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", source.package_file)
        if not os.path.exists(path):
            raise UpbenchError(f"{what}: packaged file {path} is missing; reinstall upbench")
        return path
    try:
        if source.hf_repo:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id=source.hf_repo, filename=source.hf_file)
        if source.url:
            hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
            os.makedirs(hub_dir, exist_ok=True)
            dst = os.path.join(hub_dir, os.path.basename(source.url.split("?")[0]))
            if not os.path.exists(dst):
                torch.hub.download_url_to_file(source.url, dst, progress=False)
            return dst
    except Exception as exc:  # network errors come in many types (OSError, HTTPError, hub errors)
        raise UpbenchError(
            f"could not download {what} from {source.describe()} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            f"download it elsewhere and pass the local file path instead"
        ) from None
    raise UpbenchError(f"{what} cannot be downloaded automatically: {source.notes or 'no download source'}; "
                       "pass a local file path")


def read_state_dict(path: str) -> Dict[str, object]:
    """Read a .safetensors / .pth / .bin / .ckpt file with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise UpbenchError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UpbenchError(
            f"cannot read {path} with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    if not isinstance(obj, Mapping):
        raise UpbenchError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def unwrap(obj: Mapping[str, object], keys: Sequence[str] = WRAPPER_KEYS) -> Dict[str, torch.Tensor]:
    """Descend into dict wrappers (``{'state_dict': ...}``, ``{'jafar': ...}``) until the values are tensors."""
    current: Mapping[str, object] = obj
    for _ in range(4):
        if current and all(isinstance(v, torch.Tensor) for v in current.values()):
            break
        inner = next((current[k] for k in keys if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    return {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> Dict[str, torch.Tensor]:
    prefixes = tuple(prefixes)
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """``load_state_dict`` with one clear message naming missing and unexpected keys (and shape mismatches)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]

    def brief(keys):
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys [{brief(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{brief(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{brief(shapes)}]")
        raise UpbenchError(f"{what} does not fit this model: " + "; ".join(parts))
    module.load_state_dict(dict(sd), strict=strict)
