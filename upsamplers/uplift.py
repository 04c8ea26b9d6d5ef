"""UPLiFT (arXiv 2601.17950): a full-resolution convolutional image encoder, a small decoder that builds a guide
map at 2x the feature grid, and a Local Attender that writes every high-resolution vector as a softmax-weighted
(convex) combination of the incoming low-resolution vectors in a small neighbourhood.  Iterated ``k`` times it gives
``2^k`` x upsampling.  The SD1.5-VAE variant adds noise channels and a refiner after the attender.

Module names follow the official ``state_dict`` layout (``encoder.block_k.blocks.j.conv.N.*``, ``decoder.block_0``,
``decoder.up_1.up``, ``attender.conv1``, ``refiner.blocks.j``, ``ref_outc``), so release files load strictly.

This file is the model as the paper draws it; its kernels live in :mod:`._uplift_blocks` (encoder / decoder blocks)
and :mod:`._uplift_attend` (the Local Attender).  Two numerically equivalent execution paths exist:

* the reference path (``fast=False`` or training mode): the modules run as built, the attender gathers the
  neighbours and broadcasts them to high resolution, and a requested output size is a separate resize;
* the default inference path: BatchNorm folded into the preceding conv, channels-last tensors, the last encoder
  block evaluated only on the pixels the decoder reads (a strided conv; exact because the decoder resamples the
  encoder maps with top-left ``nearest``), channel concatenations never written (the conv reading one is split by
  input channels), 1x1 convs and their residual as one GEMM, and an attender that combines the low-res neighbours
  of each cell with batched matmuls over strided views of the low-res map, one low-res row at a time
  (:class:`_NeighbourMix`).  When the output is resized and there is no refiner, the last step applies the
  separable antialiased resize to each finished row, so its native-size map is never held whole.

The inference path may also run its encoder and decoder in a reduced precision (``compute_dtype``, opt-in; not
numerically equivalent), the attender and output staying in the features' precision.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from upbench.checkpoints import PretrainedCfg, WeightSource
from upbench.dtypes import parse_dtype
from upbench.errors import UpbenchError

from . import register
from ._uplift_attend import (ATTENDER_OFFSETS, DirectHead, LocalAttender, _resize_bilinear_aa,  # noqa: F401
                             attender_offsets, attender_padding, local_attend_fast, local_attend_reference)
from ._uplift_blocks import (BlockGroup, UPLiFTDecoder, UPLiFTEncoder, _conv, noise_and_combine,  # noqa: F401
                             noise_and_combine_parts, residual_auto)
from .base import Upsampler, as_size

CONFIG_DIR = Path(__file__).with_name("uplift_configs")
CONFIG_NAMES = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))   # the bundled architecture configs
DEFAULT_CONFIG_FOR_PATCH = {14: "uplift_dinov2-s14", 16: "uplift_dinov3-splus16", 8: "uplift_sd1.5vae"}


# ----------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """OmegaConf containers / mappings / sequences -> plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A whole official config (``{backbone:, uplift:}``) from a name, a YAML path, or a mapping.

    A mapping without an ``uplift`` key is taken to be the ``uplift:`` section itself."""
    if isinstance(config, (str, os.PathLike)):
        name = str(config)
        path = Path(name)
        if not path.is_file():
            stem = name[:-5] if name.endswith(".yaml") else name
            path = CONFIG_DIR / f"{stem}.yaml"
        if not path.is_file():
            raise UpbenchError(f"UPLiFT: unknown arch '{name}' (neither a file nor one of {', '.join(CONFIG_NAMES)})")
        import yaml

        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    else:
        data = _plain(config)
    if not isinstance(data, dict):
        raise UpbenchError(f"UPLiFT: config {config!r} is not a mapping")
    if "uplift" not in data:
        data = {"uplift": data}
    return data


PAPER = "https://arxiv.org/abs/2601.17950"


def _hf(name: str) -> WeightSource:
    return WeightSource(hf_repo=f"UPLiFT-upsampler/{name}", hf_file=f"{name}.safetensors", licence="MIT",
                        notes=f"official UPLiFT release ({name}); plain safetensors state_dict, strict load")


PRETRAINED = {
    "uplift_dinov2-s14": PretrainedCfg(
        "uplift_dinov2-s14", "vit_small_patch14_dinov2.lvd142m", 384, 14, _hf("uplift_dinov2-s14"), PAPER,
        kwargs={"arch": "uplift_dinov2-s14"}, backbone_aliases=("dinov2_s14",)),
    "uplift_dinov3-splus16": PretrainedCfg(
        "uplift_dinov3-splus16", "vit_small_plus_patch16_dinov3.lvd1689m", 384, 16, _hf("uplift_dinov3-splus16"),
        PAPER, kwargs={"arch": "uplift_dinov3-splus16"}, backbone_aliases=("dinov3_splus16",)),
    # trained here for the `demo` backbone (EfficientNet-Lite0 blocks.4, C=112, stride 16); see README
    "demo": PretrainedCfg(
        "demo", "demo", 112, 16, WeightSource(package_file="uplift_demo.safetensors", licence="MIT",
                                              notes="upbench train on builtin:skimage photos; for backbone=demo only"),
        PAPER, kwargs={"arch": "uplift_dinov3-splus16"},
        notes="trained by upbench for its offline demo backbone (EfficientNet-Lite0 blocks.4)"),
    # SD1.5 VAE latents; the guidance image is raw RGB in [0, 1]
    "uplift_sd1.5vae": PretrainedCfg(
        "uplift_sd1.5vae", "stable-diffusion-v1-5/stable-diffusion-v1-5", 4, 8, _hf("uplift_sd1.5vae"), PAPER,
        image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), kwargs={"arch": "uplift_sd1.5vae"},
        backbone_aliases=("sd15_vae",), notes="Stable Diffusion 1.5 VAE latents (4 channels, stride 8)"),
}


@register("uplift")
class UPLiFT(Upsampler):
    """UPLiFT with the official module layout.

    ``UPLiFT(in_channels=384, patch_size=14, arch=None, iters=None, low_mem=False, dtype=None,
    image_mean=None, image_std=None, fast=True, compute_dtype=None, attender=None, kernel="auto")``

    * ``arch``: an architecture config name (``uplift_dinov2-s14``, ``uplift_dinov3-splus16``, ``uplift_sd1.5vae``,
      ``uplift_vae_small``), a YAML path, or a mapping (a whole config or just its ``uplift:`` section).  Default:
      chosen from ``patch_size``.  (Formerly ``config``, a name ``save_pretrained`` reserves.)
    * ``iters``: fixed number of 2x steps for :meth:`forward`; ``None`` picks it from the requested output size.
    * ``image_mean`` / ``image_std``: the normalisation the guidance image must carry (ImageNet for DINO backbones;
      the official code uses 0.5 / 0.5 for non-DINO timm backbones).
    * ``fast``: use the inference path in eval mode (folded BatchNorm, channels-last, no concatenations, a
      row-by-row attender with the output resize folded in; same numbers, see the module docstring).
    * ``attender``: the Local Attender's neighbourhood (5, 9, 13, 17 or 25; ``none``: no attender, the ablation of
      UPLiFT Table 7), overriding the config's; for ablations trained from scratch.
    * ``kernel``: the Local Attender's inference kernel: ``auto`` (default: ``rows`` on the CPU, ``vectorised`` on
      GPUs), ``rows`` (row by row, the output resize folded in: fewest bytes, many small ops), ``vectorised`` (a
      fixed number of launches at any size, no host work: for GPUs), ``compile`` (``vectorised`` through
      ``torch.compile``, CUDA only; elsewhere it runs as ``vectorised``).  All give the same numbers (fp32, 1e-5).
    * ``compute_dtype``: opt-in reduced precision for that path, e.g. ``"bfloat16"``: the encoder and decoder
      (convolutions, ~85% of the time) run in it, while the attender's logits, softmax and mix stay in the
      features' precision, as does the output.  ``None`` (default): the parameters' dtype throughout.

    Official-style API: :meth:`enable_iterative`, :meth:`return_steps`, :meth:`forward_official`
    (``model(img, feats, outsize)`` semantics); harness API: :meth:`forward`, :meth:`forward_steps`.
    """

    official_methods = ("UPLiFT",)
    iterative = True
    pretrained_cfgs = {tag: PRETRAINED[tag] for tag in ("uplift_dinov2-s14", "uplift_dinov3-splus16", "demo")}
    pretrained_sources = {tag: cfg.source for tag, cfg in PRETRAINED.items()}
    renamed_arguments = {"config": "arch", "cfg": "arch"}
    checkpoint_prefixes = ("module.", "model.", "uplift.")
    checkpoint_wrappers = ("state_dict_ema", "state_dict", "model", "module", "net", "params")
    default_config: Optional[str] = None

    def __init__(self, in_channels: int = 384, patch_size: int = 14,
                 arch: Union[None, str, os.PathLike, Mapping[str, Any]] = None, iters: Optional[int] = None,
                 low_mem: bool = False, dtype: Any = None, image_mean: Optional[Sequence[float]] = None,
                 image_std: Optional[Sequence[float]] = None, fast: bool = True, compute_dtype: Any = None,
                 attender: Any = None, kernel: str = "auto"):
        super().__init__()
        if arch is None:
            arch = self.default_config or DEFAULT_CONFIG_FOR_PATCH.get(int(patch_size), "uplift_dinov2-s14")
        full = load_config(arch)
        ucfg = full["uplift"]
        self.arch_config = full
        self.arch_name = str(arch) if isinstance(arch, (str, os.PathLike)) else None
        self.in_channels = int(in_channels)
        self.patch_size = int(patch_size)
        self.up_factor = int(ucfg.get("up_factor", 2))
        self.enc_share = bool(ucfg.get("enc_share", True))
        if not self.enc_share:
            raise UpbenchError("UPLiFT: only enc_share=True configs are supported (every released config uses it)")
        self.iters = None if iters is None else int(iters)
        self.low_mem = bool(low_mem)
        self.fast = bool(fast)
        self.compute_dtype = parse_dtype(compute_dtype, "UPLiFT compute_dtype")
        self._return_steps = False
        if image_mean is not None:
            self.image_mean = tuple(float(v) for v in image_mean)
        if image_std is not None:
            self.image_std = tuple(float(v) for v in image_std)

        self.encoder = UPLiFTEncoder(ucfg["encoder"])
        self.decoder = UPLiFTDecoder(ucfg["decoder"], self.in_channels, self.encoder.widths)
        if self.decoder.factor != self.up_factor:
            raise UpbenchError(f"UPLiFT: decoder upsamples by {self.decoder.factor}, config says up_factor={self.up_factor}")
        n = ucfg.get("attender", 17) if attender is None else attender
        if str(n).lower() in ("none", "0"):   # the "no Local Attender" ablation
            self.attender = DirectHead(self.decoder.out_channels, self.in_channels)
        else:
            attender_offsets(n)   # a clear error for an unsupported size
            self.attender = LocalAttender(self.decoder.out_channels, int(n), low_mem=self.low_mem, kernel=kernel)
        rcfg = ucfg.get("refiner")
        if rcfg:
            self.ref_con = int(rcfg.get("ref_con", -1))
            self.ref_ncat_c, self.ref_ncat_s = int(rcfg.get("ncat_c", 0)), float(rcfg.get("ncat_s", 1))
            if rcfg.get("enc_resample", "nearest") != "nearest":
                raise UpbenchError(f"UPLiFT: unsupported refiner enc_resample '{rcfg.get('enc_resample')}'")
            ref_in = self.in_channels + self.encoder.widths[self.ref_con] + self.ref_ncat_c
            self.refiner = BlockGroup(ref_in, rcfg["block_0"])
            self.ref_outc = nn.Conv2d(self.refiner.out_channels, self.in_channels, 1)
        else:
            self.refiner = None
        dt = parse_dtype(dtype, "UPLiFT")
        if dt is not None:
            self.to(dt)

    # ------------------------------------------------------------------ official-style switches
    def enable_iterative(self, iters: int) -> "UPLiFT":
        self.iters = int(iters)
        return self

    def return_steps(self, flag: bool = True) -> "UPLiFT":
        self._return_steps = bool(flag)
        return self

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _use_fast(self) -> bool:
        # the inference path writes into preallocated tensors: only where nothing needs gradients
        return self.fast and not self.training and not torch.is_grad_enabled()

    # ------------------------------------------------------------------ core
    def _enc_last_stride(self, enc_size: Tuple[int, int], feat_size: Tuple[int, int], iters: int) -> int:
        """Largest s such that every map the decoder / refiner reads from the last encoder output is a top-left
        ``nearest`` subsampling of the stride-s grid (then computing that last block strided is exact)."""
        EH, EW = enc_size
        h, w = feat_size
        f = self.up_factor
        sizes = [(h * f ** s, w * f ** s) for s in range(iters)]  # decoder block_0 reads enc[-1] at step inputs
        if self.decoder.up_steps >= self.encoder.depth:
            return 1
        if self.refiner is not None and self.ref_con in (-1, self.encoder.depth - 1):
            sizes += [(h * f ** (s + 1), w * f ** (s + 1)) for s in range(iters)]
        g = 0
        for rh, rw in sizes:
            if rh <= 0 or rw <= 0 or EH % rh or EW % rw:
                return 1
            g = math.gcd(g, math.gcd(EH // rh, EW // rw))
        return max(1, g)

    def _step(self, x: torch.Tensor, enc: Sequence[torch.Tensor], fast: bool,
              size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """One decoder / attender (/ refiner) step; ``size`` resizes its output (antialiased bilinear).  Without a
        refiner the fast path folds that resize into the attender, so the native-size map is never held whole."""
        guide = self.decoder(x.to(enc[0].dtype), enc, fast=fast)
        fuse = fast and self.refiner is None
        y = self.attender(x, guide, fast=fast, size=size if fuse else None)
        if self.refiner is not None:
            if fast:
                r = noise_and_combine_parts(y.to(enc[0].dtype), enc[self.ref_con], self.ref_ncat_c, self.ref_ncat_s)
                r = self.refiner(r, fast=True)
                y = _conv(r, self.ref_outc.weight, self.ref_outc.bias, 1, 0, True).to(x.dtype)
            else:
                r = noise_and_combine(y, enc[self.ref_con], self.ref_ncat_c, self.ref_ncat_s)
                y = self.ref_outc(self.refiner(r))
        if size is not None and tuple(y.shape[-2:]) != tuple(size):
            y = _resize_bilinear_aa(y, size)
        return y

    def run_steps(self, enc_image: torch.Tensor, features: torch.Tensor, iters: int,
                  size: Optional[Tuple[int, int]] = None) -> List[torch.Tensor]:
        """Encoder once on ``enc_image`` (already at encoder resolution), then ``iters`` decoder/attender steps;
        ``size``: the last step's output is resized to it."""
        if iters < 1:
            raise UpbenchError(f"UPLiFT: iters must be >= 1, got {iters}")
        fast = self._use_fast()
        dt = self.param_dtype
        img, x = enc_image.to(dt), features.to(dt)
        stride = 1
        if fast:
            img = img.to(self.compute_dtype or dt).contiguous(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            stride = self._enc_last_stride(tuple(img.shape[-2:]), tuple(x.shape[-2:]), iters)
        enc = self.encoder(img, last_stride=stride, fast=fast)
        steps = []
        for i in range(iters):
            x = self._step(x, enc, fast, size=size if i == iters - 1 else None)
            steps.append(x)
        return steps

    def prescale(self, image: torch.Tensor) -> torch.Tensor:
        """The official patch-14 pre-scale: (H, W) -> (H*16//14, W*16//14), antialiased bilinear."""
        if self.patch_size != 14:
            return image
        H, W = image.shape[-2:]
        return _resize_bilinear_aa(image, (H * 16 // 14, W * 16 // 14))

    def forward_official(self, image: torch.Tensor, features: torch.Tensor, outsize: Any = None):
        """``UPLiFT.forward(img, feats, outsize)`` of the official code: ``self.iters`` steps (1 if unset); the
        list of steps when :meth:`return_steps` is on; ``outsize`` resizes the final map (and wins over steps)."""
        if outsize is not None:
            return self.run_steps(self.prescale(image), features, self.iters or 1, size=as_size(outsize))[-1]
        steps = self.run_steps(self.prescale(image), features, self.iters or 1)
        if self._return_steps:
            return steps
        return steps[-1]

    # ------------------------------------------------------------------ harness API
    def steps_for(self, feat_size: Tuple[int, int], output_size: Tuple[int, int]) -> int:
        """Number of 2x steps to reach at least ``output_size`` from ``feat_size`` (>= 1)."""
        if self.iters is not None:
            return self.iters
        (h, w), (H, W) = feat_size, output_size
        r = max(H / h, W / w)
        return max(1, math.ceil(math.log(r, self.up_factor) - 1e-9)) if r > 1 else 1

    def encoder_size(self, image_size: Tuple[int, int], feat_size: Tuple[int, int]) -> Tuple[int, int]:
        """Encoder input size: the feature grid times 16 for patch 14 (the official pre-scale), times the patch size
        otherwise, times the power of two closest to how much larger the image is than the feature grid."""
        (H, W), (h, w) = image_size, feat_size
        p = self.patch_size
        q = 16.0 if p == 14 else float(p)
        ratio = max(H / (h * p), W / (w * p))
        m = round(math.log2(ratio)) if ratio > 0 else 0
        m = max(m, -math.floor(math.log2(q)))
        q = q * 2.0 ** m
        return (max(1, int(round(h * q))), max(1, int(round(w * q))))

    def encoder_image(self, image: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        H, W = image.shape[-2:]
        h, w = feat_size
        if self.patch_size == 14 and (H, W) == (h * 14, w * 14):
            return self.prescale(image)  # the official route, exactly
        size = self.encoder_size((H, W), (h, w))
        return image if size == (H, W) else _resize_bilinear_aa(image, size)

    def forward_steps(self, image: torch.Tensor, features: torch.Tensor, iters: Optional[int] = None) -> List[torch.Tensor]:
        """Every step's output (2x, 4x, ...) for ``iters`` steps (default: ``self.iters`` or 1)."""
        h, w = features.shape[-2:]
        return self.run_steps(self.encoder_image(image, (h, w)), features, iters or self.iters or 1)

    def native_output_size(self, feature_size, output_size):
        h, w = int(feature_size[0]), int(feature_size[1])
        k = self.steps_for((h, w), as_size(output_size))
        return (h * self.up_factor ** k, w * self.up_factor ** k)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        h, w = features.shape[-2:]
        if output_size is None:
            output_size = tuple(image.shape[-2:])
        size = as_size(output_size)
        k = self.steps_for((h, w), size)
        y = self.run_steps(self.encoder_image(image, (h, w)), features, k, size=size)[-1]
        return y.to(features.dtype)

    # ------------------------------------------------------------------ official constructor / call (golden data)
    @classmethod
    def from_official(cls, method: str, constructor: Mapping[str, Any]) -> "UPLiFT":
        if method not in cls.official_methods:
            raise UpbenchError(f"{cls.__name__} cannot build official '{method}' modules")
        return cls(in_channels=constructor["in_channels"], patch_size=constructor["patch_size"],
                   arch=constructor["cfg"], iters=constructor.get("iters"),
                   low_mem=bool(constructor.get("low_mem", False)), dtype=constructor.get("dtype"))

    def run_official(self, method: str, inputs: Mapping[str, Any], constructor: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """``enable_iterative(iters)``; ``return_steps(True)`` -> step_1..step_k; then ``return_steps(False)`` and
        ``model(image, features[, outsize])`` -> output."""
        self.enable_iterative(int(constructor.get("iters") or 1))
        image, feats = inputs["image"], inputs["features"]
        self.return_steps(True)
        steps = self.forward_official(image, feats)
        out = {f"step_{i + 1}": s for i, s in enumerate(steps)}
        self.return_steps(False)
        outsize = inputs.get("outsize")
        out["output"] = self.forward_official(image, feats, outsize=list(outsize) if outsize is not None else None)
        return out


@register("uplift_vae")
class UPLiFTVAE(UPLiFT):
    """UPLiFT for Stable Diffusion 1.5 VAE latents (C=4, stride 8); the guidance image is raw RGB in [0, 1]."""

    official_methods = ()
    pretrained_cfgs = {"uplift_sd1.5vae": PRETRAINED["uplift_sd1.5vae"]}
    default_config = "uplift_sd1.5vae"
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self, in_channels: int = 4, patch_size: int = 8,
                 arch: Union[None, str, os.PathLike, Mapping[str, Any]] = None, **kwargs: Any):
        """``UPLiFT``'s arguments (``iters``, ``dtype``, ``compute_dtype``, ...) with VAE defaults."""
        super().__init__(in_channels=in_channels, patch_size=patch_size, arch=arch, **kwargs)
