"""The one contract every upsampler follows, and the plumbing shared by all of them.

``forward(image, features, output_size) -> (B, C, H_out, W_out)``:
  * ``image``    (B, 3, H, W), normalised as the upsampler expects (the task takes care of that);
  * ``features`` (B, C, h, w), low-resolution backbone features;
  * ``output_size`` (H_out, W_out), the exact spatial size returned.
Quirks of the official APIs (argument order, fixed 16x outputs, tokens vs maps) live inside each adapter.

Constructors declare every argument they take (``in_channels`` and ``patch_size`` always, which parameter-free
methods ignore); anything else is refused with the valid names.  Every upsampler is a
``huggingface_hub.PyTorchModelHubMixin``: ``save_pretrained(folder)`` writes ``model.safetensors`` and
``config.json`` (the constructor arguments), ``from_pretrained(folder or hub id)`` rebuilds it, ``push_to_hub``
uploads it.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from upbench import checkpoints
from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.errors import UpbenchError

#: how ``load_official`` / ``create`` tell the user to pass a local copy of an official checkpoint
LOCAL_WEIGHTS = "the local file as weights=/path/to/file (upbench run: upsampler.weights=/path/to/file)"

Size = Tuple[int, int]


# ------------------------------------------------------------------------------------------- device paths
#: which implementation each upsampler runs: ``auto`` (by the tensors' device: the CPU path on the CPU, the
#: accelerator path elsewhere), ``device`` (the accelerator path everywhere: how tests cover it on the CPU) or
#: ``cpu``.  Default from the environment variable ``UPBENCH_KERNEL_PATH``; :func:`kernel_path` sets it for a block.
KERNEL_PATHS = ("auto", "device", "cpu")
_kernel_path = [os.environ.get("UPBENCH_KERNEL_PATH", "auto").strip().lower() or "auto"]


@contextlib.contextmanager
def kernel_path(path: str) -> Iterator[None]:
    """``with kernel_path("device"): model(...)`` runs the accelerator path on any device (same numbers)."""
    if path not in KERNEL_PATHS:
        raise UpbenchError(f"kernel path {path!r} is not one of {KERNEL_PATHS}")
    _kernel_path.append(path)
    try:
        yield
    finally:
        _kernel_path.pop()


def use_device_path(t: torch.Tensor) -> bool:
    """True where the accelerator path should run for tensors like ``t``: few large launches, no host work."""
    path = _kernel_path[-1]
    if path not in KERNEL_PATHS:
        raise UpbenchError(f"UPBENCH_KERNEL_PATH={path!r} is not one of {KERNEL_PATHS}")
    return path == "device" or (path == "auto" and t.device.type != "cpu")


#: free memory assumed on devices that cannot report it (``meta``, where launches are counted); None = unbounded
ASSUMED_FREE_BYTES: Dict[str, Optional[int]] = {"meta": None}


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Bytes an upsampler may still allocate on ``device``: the driver's free memory plus PyTorch's cached blocks on
    CUDA; None where unknown (then work is not split by memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return ASSUMED_FREE_BYTES.get(device.type)


def query_chunk(num_queries: int, bytes_per_query: int, device: torch.device, fraction: float = 0.5) -> int:
    """Accelerator path: queries per chunk so that one chunk uses at most ``fraction`` of the free device memory;
    ``num_queries`` (one piece, no loop) whenever it fits, which a chunk count that grows with the image never is."""
    free = free_device_bytes(device)
    if free is None:
        return num_queries
    return max(1, min(num_queries, int(free * fraction) // max(1, int(bytes_per_query))))


def as_size(output_size: Any) -> Size:
    if isinstance(output_size, int):
        return (output_size, output_size)
    h, w = output_size
    return (int(h), int(w))


def accepted_arguments(cls: type) -> Tuple[List[str], int, bool]:
    """The keyword arguments ``cls(...)`` accepts (following ``**kwargs`` handed on to a parent class's
    ``__init__``), how many may be positional (-1: any), and whether it takes any keyword at all (a ``**kwargs``
    that no parent ``__init__`` receives)."""
    names: List[str] = []
    positional = None
    for klass in cls.__mro__:
        if klass is Upsampler:   # nn.Module and the hub mixin follow; Upsampler has no __init__ of its own
            break
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
        if positional is None:
            positional = -1 if any(p.kind == p.VAR_POSITIONAL for p in params) else \
                sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names, positional, False
    return names, -1 if positional is None else positional, positional is not None


class Upsampler(nn.Module, PyTorchModelHubMixin, library_name="upbench", tags=["upbench", "feature-upsampling"]):
    #: registry name, set by ``@register``
    registry_name: ClassVar[str] = ""
    #: ``method`` strings of the official implementations this class reproduces (as in golden files)
    official_methods: ClassVar[Tuple[str, ...]] = ()
    #: official checkpoints with what each needs (backbone, channels, normalisation, source, licence, paper):
    #: {tag: PretrainedCfg}; the first one is the default of ``create(name, pretrained=True)``
    pretrained_cfgs: ClassVar[Dict[str, PretrainedCfg]] = {}
    #: official checkpoints loadable by name: {name: WeightSource}
    pretrained_sources: ClassVar[Dict[str, WeightSource]] = {}
    #: constructor arguments that were renamed: {old name: new name}
    renamed_arguments: ClassVar[Dict[str, str]] = {}
    #: prefixes stripped from official checkpoints before loading
    checkpoint_prefixes: ClassVar[Tuple[str, ...]] = ("module.",)
    #: wrapper keys unwrapped from official checkpoints
    checkpoint_wrappers: ClassVar[Tuple[str, ...]] = checkpoints.WRAPPER_KEYS
    #: whether the official loader is strict
    checkpoint_strict: ClassVar[bool] = True
    #: image normalisation the official model was trained with (ImageNet unless stated)
    image_mean: ClassVar[Sequence[float]] = (0.485, 0.456, 0.406)
    image_std: ClassVar[Sequence[float]] = (0.229, 0.224, 0.225)
    #: True for methods with no learned weights
    parameter_free: ClassVar[bool] = False
    #: licence of the method's code that this implementation follows ("" where not stated); official weights carry
    #: their own in ``pretrained_cfgs``.  Both are shown by ``upbench list``.
    licence: ClassVar[str] = ""
    #: how cost grows with the number of tokens: "interpolation", "classical" (training-free image filters: linear in
    #: pixels), "local" (convolutions / fixed neighbourhoods: linear in pixels) or "cross-attention" (every pixel
    #: attends to the tokens: pixels x tokens)
    family: ClassVar[str] = "local"
    #: True for methods that reach their output in repeated 2x steps and expose every step through
    #: ``forward_steps(image, features, iters) -> [2x, 4x, ...]`` (the ``stability`` task measures their drift)
    iterative: ClassVar[bool] = False

    #: the official checkpoint this instance was configured for by ``upsamplers.create`` (None: none)
    pretrained_cfg: Optional[PretrainedCfg] = None

    def __new__(cls, *args: Any, **kwargs: Any):
        check_arguments(cls, args, kwargs)
        return super().__new__(cls, *args, **kwargs)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        raise NotImplementedError

    def native_output_size(self, feature_size: Size, output_size: Size) -> Size:
        """The size the method itself produces on its way to ``output_size`` before any final resize (FeatUp: 16x the
        features; LiFT / UPLiFT: the 2^k steps that reach it).  With ``task.resize_at=logits`` a probe reads the
        features at this size and resizes its logits instead, as the official suites do."""
        return as_size(output_size)

    # ----------------------------------------------------------------- bookkeeping
    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- official weights
    def convert_official_state_dict(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map official key names to this module's (identity when they already agree)."""
        return sd

    def load_official(self, name_or_path: str, strict: Optional[bool] = None) -> "Upsampler":
        """Load official weights from a local file (or a ``save_pretrained`` folder), or by name from
        :attr:`pretrained_sources` (downloads)."""
        if os.path.exists(name_or_path) or name_or_path.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors")):
            path = name_or_path
        elif name_or_path in self.pretrained_sources:
            path = checkpoints.download(self.pretrained_sources[name_or_path],
                                        f"{self.registry_name} weights '{name_or_path}'", local=LOCAL_WEIGHTS)
        else:
            names = ", ".join(sorted(self.pretrained_sources)) or "none"
            raise UpbenchError(f"{self.registry_name}: '{name_or_path}' is neither a file nor an official checkpoint "
                               f"name (known names: {names})")
        raw = checkpoints.read_state_dict(path)
        self.load_official_state_dict(raw, what=f"{self.registry_name} checkpoint {path}", strict=strict)
        return self

    def load_official_state_dict(self, raw: Mapping[str, Any], what: str = "state dict",
                                 strict: Optional[bool] = None) -> None:
        sd = checkpoints.unwrap(raw, self.checkpoint_wrappers)
        sd = checkpoints.strip_prefixes(sd, self.checkpoint_prefixes)
        sd = self.convert_official_state_dict(sd)
        checkpoints.load_strict(self, sd, what, self.checkpoint_strict if strict is None else strict)

    # ----------------------------------------------------------------- save_pretrained / from_pretrained
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> "Upsampler":
        """Rebuild a model written by ``save_pretrained`` (a folder, or a Hugging Face hub id): the constructor
        arguments from ``config.json``, the weights from ``model.safetensors`` (strict by default)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (UpbenchError, TypeError, ValueError):
            raise
        except Exception as exc:  # hub / network / file errors
            reason = checkpoints.short_reason(str(exc))
            raise UpbenchError(f"{cls.registry_name or cls.__name__}: cannot load '{pretrained_model_name_or_path}' "
                               f"({type(exc).__name__}: {reason}); pass a folder written by save_pretrained") from None

    def _own_normalisation(self) -> Optional[Dict[str, List[float]]]:
        """The image normalisation of this instance when it differs from its class's and the constructor does not
        take it (e.g. set by ``upsamplers.create`` for a checkpoint): saved in ``config.json`` next to the
        constructor arguments."""
        if "image_mean" in accepted_arguments(type(self))[0]:
            return None
        own = (tuple(self.image_mean), tuple(self.image_std))
        if own == (tuple(type(self).image_mean), tuple(type(self).image_std)):
            return None
        return {"image_mean": [float(v) for v in own[0]], "image_std": [float(v) for v in own[1]]}

    def _save_pretrained(self, save_directory: Any) -> None:
        super()._save_pretrained(save_directory)
        norm = self._own_normalisation()
        if norm is not None:   # config.json written here is kept as it is by save_pretrained
            config = {**(self._hub_mixin_config or {}), **norm}
            with open(os.path.join(str(save_directory), "config.json"), "w", encoding="utf-8") as fh:
                json.dump(config, fh, sort_keys=True, indent=2)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, map_location: str = "cpu", strict: bool = True,
                         config: Optional[Mapping[str, Any]] = None, proxies: Any = None, resume_download: Any = None,
                         **model_kwargs: Any) -> "Upsampler":
        # config: the whole config.json; proxies / resume_download: passed by older huggingface_hub releases, unused
        model = cls(**model_kwargs)
        if config and "image_mean" in config and "image_mean" not in accepted_arguments(cls)[0]:
            model.image_mean, model.image_std = tuple(config["image_mean"]), tuple(config["image_std"])
        if os.path.isdir(model_id):
            path = os.path.join(model_id, checkpoints.SAVED_WEIGHTS)
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=model_id, filename=checkpoints.SAVED_WEIGHTS, revision=revision,
                                   cache_dir=cache_dir, force_download=force_download, token=token,
                                   local_files_only=local_files_only)
        sd = checkpoints.read_state_dict(path)
        checkpoints.load_strict(model, sd, f"{cls.registry_name or cls.__name__} weights {path}", strict)
        return model.to(map_location).eval()

    # ----------------------------------------------------------------- reproducing official calls (golden data)
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "Upsampler":
        """Build the module an official ``constructor`` description describes."""
        raise NotImplementedError(f"{cls.__name__} cannot build official '{method}' modules")

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Reproduce the official call on ``inputs`` and return every output the official code exposes."""
        raise NotImplementedError


class _Interpolate(Upsampler):
    parameter_free = True
    family = "interpolation"
    licence = "BSD-3-Clause (PyTorch F.interpolate)"
    mode: ClassVar[str] = "bilinear"

    def __init__(self, in_channels: Optional[int] = None, patch_size: Optional[int] = None):
        super().__init__()   # no parameters: in_channels / patch_size are accepted (runs pass them) and unused

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        kwargs = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return nn.functional.interpolate(features, size=as_size(output_size), mode=self.mode, **kwargs)


def check_arguments(cls: type, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """One clear error for a constructor argument ``cls`` does not take (with the valid names), a renamed one (with
    its new name), or too many positional arguments."""
    names, positional, any_keyword = accepted_arguments(cls)
    who = getattr(cls, "registry_name", "") or cls.__name__
    if 0 <= positional < len(args):
        raise UpbenchError(f"{who}: takes at most {positional} positional arguments ({', '.join(names[:positional])})"
                           f", got {len(args)}")
    for key in kwargs:
        if key in names:
            continue
        new = getattr(cls, "renamed_arguments", {}).get(key)
        if new:
            value = kwargs[key]
            raise UpbenchError(f"{who}: the argument '{key}' is now called '{new}': pass {new}={value!r} "
                               f"(upbench run: upsampler.kwargs.{new}={value})")
        if any_keyword:
            continue
        hint = ("; pretrained / backbone / weights are arguments of upsamplers.create"
                if key in ("pretrained", "backbone", "weights") else "")
        raise UpbenchError(f"{who}: unknown argument '{key}'; valid arguments: {', '.join(names)}{hint}")
