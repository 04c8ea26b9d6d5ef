"""Image autoencoders ("VAEs") behind one small interface, for work in a diffusion model's latent space.

Every VAE here exposes ``encode(image01) -> latents``, ``decode(latents) -> image01``, ``latent_channels``,
``scale_factor`` (pixels per latent cell) and ``name``; images are (B, 3, H, W) in [0, 1] with H, W multiples of
``scale_factor``.

* ``taef2``: TAEF2, the tiny autoencoder for the FLUX.2 latent space by Ollin Boer Bohan (madebyollin/taesd, MIT).
  About 1.3 M parameters per half. Its latents are the ones the FLUX.2 transformer works on (the FLUX.2 VAE's
  latents after its batch-norm normalisation) with the 2x2 patchify undone: 32 channels at stride 8, roughly unit
  variance, not 128 channels at stride 16.
* ``sd15``: the Stable Diffusion 1.5 KL autoencoder through diffusers (4 channels, stride 8, scaled by 0.18215).

Build one from a config with ``create_vae({"kind": "taef2"})`` or ``create_vae({"kind": "sd15", ...})``.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from upbench import checkpoints, hub
from upbench.checkpoints import WeightSource, load_strict, read_state_dict
from upbench.dtypes import parse_dtype
from upbench.errors import UpbenchError
from upbench.registry import BACKBONES, Registry

from .base import Backbone

VAES = Registry("vae")

PathLike = Union[str, os.PathLike]

TAEF2_DIR_ENV = "UPBENCH_TAEF2_DIR"
TAEF2_SOURCE = "https://github.com/madebyollin/taesd (taef2_encoder.pth, taef2_decoder.pth)"
TAEF2_URLS = {part: f"https://github.com/madebyollin/taesd/raw/main/taef2_{part}.pth" for part in ("encoder", "decoder")}


# ----------------------------------------------------------------------------------------------------- TAEF2
def _conv3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """Smoothly bounds decoder inputs to (-3, 3), the range the decoder was trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Residual block: relu(conv-relu-conv-relu-conv(x) + x).

    ``pooled`` blocks (the lowest-resolution stage of TAEF2) first add a 1x1 bottleneck branch with a GroupNorm,
    ``x + (conv1x1 -> GroupNorm(4) -> relu -> conv1x1)(x)``: the norm's statistics span the whole image, giving the
    block the global context that plain 3x3 convs lack.
    """

    def __init__(self, channels: int, pooled: bool = False):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv3(c, c), nn.ReLU(), _conv3(c, c), nn.ReLU(), _conv3(c, c))
        self.fuse = nn.ReLU()
        self.pool: Optional[nn.Module] = None
        if pooled:
            hidden = 4 * c
            self.pool = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.GroupNorm(4, hidden), nn.ReLU(),
                                      nn.Conv2d(hidden, c, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def taef2_encoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """Image in [0, 1] -> latents. Sequential indices match the released state dict keys."""
    w = width

    def stage(pooled: bool = False):
        return [_Block(w, pooled), _Block(w, pooled), _Block(w, pooled)]

    return nn.Sequential(
        _conv3(3, w), _Block(w),                              # 0-1   full resolution
        _conv3(w, w, stride=2, bias=False), *stage(),         # 2-5   1/2
        _conv3(w, w, stride=2, bias=False), *stage(),         # 6-9   1/4
        _conv3(w, w, stride=2, bias=False), *stage(True),     # 10-13 1/8, with the GroupNorm branch
        _conv3(w, latent_channels),                           # 14
    )


def taef2_decoder(latent_channels: int = 32, width: int = 64) -> nn.Sequential:
    """Latents -> image (about [0, 1]; not clamped here). Parameter-free layers keep their slots (0, 2, 6, 11, 16)
    so that the indices match the released state dict keys."""
    w = width

    def stage(pooled: bool = False):
        return [_Block(w, pooled), _Block(w, pooled), _Block(w, pooled)]

    def up():
        return [nn.Upsample(scale_factor=2, mode="nearest"), _conv3(w, w, bias=False)]

    return nn.Sequential(
        _SoftClamp(), _conv3(latent_channels, w), nn.ReLU(),  # 0-2
        *stage(True), *up(),                                  # 3-5 (GroupNorm branch), 6-7
        *stage(), *up(),                                      # 8-10, 11-12
        *stage(), *up(),                                      # 13-15, 16-17
        _Block(w), _conv3(w, 3),                              # 18-19
    )


class TAEF2(nn.Module):
    """Tiny autoencoder for the FLUX.2 latent space: (B,3,H,W) in [0,1] <-> (B,32,H/8,W/8).

    The network itself works on [0, 1] images and unscaled latents (scale 1, shift 0), so no range conversion is
    needed; ``decode`` clamps its output to [0, 1].
    """

    name = "taef2"
    latent_channels = 32
    scale_factor = 8

    def __init__(self):
        super().__init__()
        self.encoder = taef2_encoder(self.latent_channels)
        self.decoder = taef2_decoder(self.latent_channels)

    @classmethod
    def from_files(cls, encoder_path: PathLike, decoder_path: PathLike,
                   dtype: torch.dtype = torch.float32) -> "TAEF2":
        """Load the released fp16 state dicts strictly (a clear error names missing / unexpected keys) and cast
        to ``dtype``. The model is returned frozen and in eval mode."""
        model = cls()
        for part, path in (("encoder", encoder_path), ("decoder", decoder_path)):
            load_strict(getattr(model, part), read_state_dict(str(path)), f"TAEF2 {part} weights {path}")
        return model.to(dtype).eval().requires_grad_(False)

    def _check(self, x: torch.Tensor, channels: int, stride: int, what: str) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != channels:
            raise UpbenchError(f"TAEF2.{what} expects a (B, {channels}, H, W) tensor, got {tuple(x.shape)}")
        if stride > 1 and (x.shape[-2] % stride or x.shape[-1] % stride):
            raise UpbenchError(f"TAEF2.{what}: image size {tuple(x.shape[-2:])} is not a multiple of {stride}; "
                               f"crop or resize it first")
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._check(image01, 3, self.scale_factor, "encode"))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._check(latents, self.latent_channels, 1, "decode")).clamp(0, 1)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        """Round trip: encode then decode."""
        return self.decode(self.encode(image01))


def taef2_paths(encoder: Optional[PathLike] = None, decoder: Optional[PathLike] = None):
    """Where the TAEF2 weights are: explicit paths, else ``$UPBENCH_TAEF2_DIR``, else torch hub's checkpoint folder
    (where :func:`taef2` downloads them)."""
    folder = Path(os.environ.get(TAEF2_DIR_ENV) or Path(torch.hub.get_dir()) / "checkpoints")
    return (Path(encoder) if encoder else folder / "taef2_encoder.pth",
            Path(decoder) if decoder else folder / "taef2_decoder.pth")


@VAES.register("taef2")
def taef2(encoder: Optional[PathLike] = None, decoder: Optional[PathLike] = None,
          dtype: Union[str, torch.dtype] = torch.float32) -> TAEF2:
    enc, dec = taef2_paths(encoder, decoder)
    explicit = {"encoder": encoder, "decoder": decoder}
    missing = [str(p) for p in (enc, dec) if not p.is_file()]
    if missing and not os.environ.get(TAEF2_DIR_ENV) and not any(explicit.values()):
        try:   # nothing configured: fetch the release files into torch hub's cache, as torch.hub would
            enc, dec = (Path(checkpoints.download(WeightSource(url=TAEF2_URLS[part], licence="MIT"),
                                                  f"TAEF2 {part}")) for part in ("encoder", "decoder"))
            missing = []
        except UpbenchError:
            pass
    if missing:
        raise UpbenchError(f"TAEF2 weights not found: {', '.join(missing)}; set backbone.encoder and backbone.decoder "
                           f"(or {TAEF2_DIR_ENV}, a folder holding both files) to the files from {TAEF2_SOURCE}")
    return TAEF2.from_files(enc, dec, dtype=parse_dtype(dtype, "vae"))


# ------------------------------------------------------------------------------------------------------ SD 1.5
SD15_REPO = hub.SD15_REPO


class SD15VAE(nn.Module):
    """Stable Diffusion 1.5's AutoencoderKL: (B,3,H,W) in [0,1] <-> (B,4,H/8,W/8) latents scaled by 0.18215
    (the scale the SD 1.5 UNet was trained with). ``encode`` is deterministic: it returns the posterior mean."""

    name = "sd15"
    latent_channels = 4
    scale_factor = 8
    scaling_factor = 0.18215

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def encode(self, image01: torch.Tensor) -> torch.Tensor:
        p = self._param()
        x = image01.to(device=p.device, dtype=p.dtype) * 2 - 1  # the KL VAE works on [-1, 1]
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self._param()
        x = self.vae.decode(latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image01))

    @property
    def pipeline_vae(self) -> nn.Module:
        """The diffusers module itself, for a diffusion pipeline that shares this VAE."""
        return self.vae


@VAES.register("sd15")
def sd15(name_or_path: str = SD15_REPO, dtype: Union[str, torch.dtype] = torch.float32) -> SD15VAE:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UpbenchError("the sd15 VAE needs diffusers; pip install diffusers") from None
    torch_dtype = parse_dtype(dtype, "vae")
    path = Path(str(name_or_path)).expanduser()
    local = path.exists() or str(name_or_path).startswith(("/", ".", "~"))
    how = (f"download '{SD15_REPO}' (its vae/ folder is enough) where there is internet and set "
           f"backbone.name_or_path to that local folder")
    if local and not path.is_dir():
        raise UpbenchError(f"sd15 VAE weights not found: no folder {path}; {how}")
    if not local:  # fetch (or find in the cache) only the VAE's files, failing fast when the hub is unreachable
        missing, root = hub.missing_weights(str(name_or_path), hub.sd15_vae_files(str(name_or_path)))
        if missing or root is None:
            raise UpbenchError(f"sd15 VAE weights not found: '{name_or_path}' (subfolder vae) is not in the Hugging "
                               f"Face cache and could not be downloaded (offline?); {how}")
        path, local = root, True
    # A local folder may be the whole pipeline (with vae/) or the vae folder itself.
    subfolder = None if local and (path / "config.json").is_file() else "vae"
    try:
        vae = AutoencoderKL.from_pretrained(
            str(path) if local else name_or_path, subfolder=subfolder, torch_dtype=torch_dtype,
            # without accelerate, diffusers would warn and fall back to this anyway
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as exc:  # offline / not cached / incomplete folder come as several exception types
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        where = (f"the local folder {path} holds no AutoencoderKL weights (config.json + diffusion_pytorch_model.*"
                 f"{'' if subfolder is None else ' under vae/'})" if local else
                 f"'{name_or_path}' (subfolder vae) is not in the Hugging Face cache and could not be downloaded "
                 f"(offline?)")
        raise UpbenchError(f"sd15 VAE weights not found: {where} [{type(exc).__name__}: {first}]; {how}") from None
    return SD15VAE(vae)


# ------------------------------------------------------------------------------------------------------ common
def create_vae(cfg: Dict[str, Any]) -> nn.Module:
    """Build a VAE from a config: ``{kind: taef2, encoder?, decoder?, dtype?}`` or
    ``{kind: sd15, name_or_path?, dtype?}``. Unknown kinds list the registered ones."""
    cfg = {k: v for k, v in (cfg or {}).items() if v is not None}  # None means "use the default"
    kind = cfg.pop("kind", "taef2")
    factory = VAES.get(kind)
    known = set(inspect.signature(factory).parameters)
    unknown = sorted(set(cfg) - known)
    if unknown:  # a misspelt key would otherwise be ignored silently
        raise UpbenchError(f"vae '{kind}' has no option(s) {', '.join(unknown)}; "
                           f"its options: {', '.join(sorted(known))}")
    return factory(**cfg)


# ------------------------------------------------------------------------------------------------------ backbone
class VAEBackbone(Backbone):
    """A frozen VAE as the generative tasks' backbone: its encoder gives the low-resolution "features" (latents,
    ``patch_size`` = the VAE's downsampling factor) and :meth:`decode` maps latents back to [0, 1] images."""

    def __init__(self, vae: str, name: Optional[str] = None, **vae_cfg: Any):
        super().__init__()
        self.vae = create_vae({"kind": vae, **vae_cfg})
        self.name = name or vae
        self.channels = int(self.vae.latent_channels)
        self.patch_size = int(self.vae.scale_factor)
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the VAE takes [0, 1] images
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.vae.encode(image)
        return z, z.new_zeros(z.shape[0], 0, z.shape[1])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


@BACKBONES.register("vae")
def vae_backbone(**cfg: Any) -> Backbone:
    return VAEBackbone(**cfg)
