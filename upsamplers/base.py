"""The one contract every upsampler follows, and the plumbing shared by all of them.

``forward(image, features, output_size) -> (B, C, H_out, W_out)``:
  * ``image``    (B, 3, H, W), normalised as the upsampler expects (the task takes care of that);
  * ``features`` (B, C, h, w), low-resolution backbone features;
  * ``output_size`` (H_out, W_out), the exact spatial size returned.
Quirks of the official APIs (argument order, fixed 16x outputs, tokens vs maps) live inside each adapter.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from upbench import checkpoints
from upbench.checkpoints import WeightSource
from upbench.errors import UpbenchError

Size = Tuple[int, int]


def as_size(output_size: Any) -> Size:
    if isinstance(output_size, int):
        return (output_size, output_size)
    h, w = output_size
    return (int(h), int(w))


class Upsampler(nn.Module):
    #: registry name, set by ``@register``
    registry_name: ClassVar[str] = ""
    #: ``method`` strings of the official implementations this class reproduces (as in golden files)
    official_methods: ClassVar[Tuple[str, ...]] = ()
    #: official checkpoints loadable by name: {name: WeightSource}
    pretrained_sources: ClassVar[Dict[str, WeightSource]] = {}
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
    #: how cost grows with the number of tokens: "interpolation", "local" (convolutions / fixed neighbourhoods:
    #: linear in pixels) or "cross-attention" (every pixel attends to the tokens: pixels x tokens)
    family: ClassVar[str] = "local"
    #: True for methods that reach their output in repeated 2x steps and expose every step through
    #: ``forward_steps(image, features, iters) -> [2x, 4x, ...]`` (the ``stability`` task measures their drift)
    iterative: ClassVar[bool] = False

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
        """Load official weights from a local file, or by name from :attr:`pretrained_sources` (downloads)."""
        if os.path.exists(name_or_path) or name_or_path.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors")):
            path = name_or_path
        elif name_or_path in self.pretrained_sources:
            path = checkpoints.download(self.pretrained_sources[name_or_path],
                                        f"{self.registry_name} weights '{name_or_path}'")
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
    mode: ClassVar[str] = "bilinear"

    def __init__(self, **_: Any):  # accepts (and ignores) in_channels, patch_size, ...
        super().__init__()

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any) -> torch.Tensor:
        kwargs = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return nn.functional.interpolate(features, size=as_size(output_size), mode=self.mode, **kwargs)
