"""Official weights: resolve a name (HF hub / URL) or a local path, read it safely, unwrap and strip prefixes,
and load strictly with a report of missing and unexpected keys."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from .errors import UpbenchError

WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model", "module", "net", "params")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the file ``save_pretrained`` writes (huggingface_hub's ``PyTorchModelHubMixin``); a folder holding it is accepted
#: wherever a weights file is
SAVED_WEIGHTS = "model.safetensors"


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


def short_reason(text: str, limit: int = 120) -> str:
    """The first line of ``text``, cut at a word boundary when longer than ``limit``."""
    line = (text.strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.") + " ..."


def download(source: WeightSource, what: str, local: str = "the local file path") -> str:
    """Fetch an official file into the usual caches (HF hub cache / torch hub cache); one clear line offline.

    ``local``: how to pass a local copy instead (named in the message), e.g. ``weights=/path/file``."""
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
            f"could not download {what} from {source.describe()} ({type(exc).__name__}: {short_reason(str(exc))}); "
            f"download it elsewhere and pass {local}"
        ) from None
    raise UpbenchError(f"{what} cannot be downloaded automatically: {source.notes or 'no download source'}; "
                       f"pass {local}")


@dataclass(frozen=True)
class PretrainedCfg:
    """One official checkpoint of an upsampler and what it needs (the counterpart of timm's ``pretrained_cfg``).

    ``tag`` is the checkpoint's name (``weights=<tag>``, ``upsampler.weights=<tag>``); ``backbone`` names the features
    it was trained on (a timm name where the features are timm's; ``backbone_aliases`` lists other names of the
    same features); ``in_channels`` / ``patch_size`` are that backbone's channels and stride (None: any / not
    stated); ``image_mean`` / ``image_std`` the normalisation of the guidance image; ``kwargs`` the constructor
    arguments the checkpoint needs beyond channels and patch size."""

    tag: str
    backbone: Optional[str]
    in_channels: Optional[int]
    patch_size: Optional[int]
    source: WeightSource
    paper: str = ""
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN
    image_std: Tuple[float, float, float] = IMAGENET_STD
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    backbone_aliases: Tuple[str, ...] = ()
    notes: str = ""

    @property
    def licence(self) -> str:
        return self.source.licence or "unstated"

    @property
    def url(self) -> str:
        """Where the file comes from: ``hf://repo/file``, a URL, or the packaged asset."""
        return self.source.describe()

    @property
    def backbones(self) -> Tuple[str, ...]:
        """Every name of the backbone it was trained on."""
        return ((self.backbone,) if self.backbone else ()) + tuple(self.backbone_aliases)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(source=self.url, licence=self.licence, kwargs=dict(self.kwargs))
        return out


def read_state_dict(path: str) -> Dict[str, object]:
    """Read a .safetensors / .pth / .bin / .ckpt file with ``weights_only=True`` (or the weights of a folder written
    by ``save_pretrained``)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SAVED_WEIGHTS)):
        path = os.path.join(path, SAVED_WEIGHTS)
    if os.path.isdir(path):
        raise UpbenchError(f"{path} is a folder, not a weights file (a folder must hold {SAVED_WEIGHTS}, as "
                           "save_pretrained writes it)")
    if not os.path.isfile(path):
        raise UpbenchError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as exc:  # noqa: BLE001  (truncated / not safetensors: the library raises its own types)
            reason = short_reason(str(exc)) or type(exc).__name__
            raise UpbenchError(f"cannot read {path}: not a complete safetensors file ({reason}); download it "
                               "again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated, not a checkpoint, or holding code: never unpickled)
        reason = short_reason(str(exc), 160) or "empty or truncated file"
        raise UpbenchError(f"cannot read {path} as a checkpoint with weights_only=True ({type(exc).__name__}: "
                           f"{reason}); pass a state dict (.safetensors / .pth)") from None
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
