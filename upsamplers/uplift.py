"""UPLiFT (arXiv 2601.17950): a full-resolution convolutional image encoder, a small decoder that builds a guide
map at 2x the feature grid, and a Local Attender that writes every high-resolution vector as a softmax-weighted
(convex) combination of the incoming low-resolution vectors in a small neighbourhood.  Iterated ``k`` times it gives
``2^k`` x upsampling.  The SD1.5-VAE variant adds noise channels and a refiner after the attender.

Module names follow the official ``state_dict`` layout (``encoder.block_k.blocks.j.conv.N.*``, ``decoder.block_0``,
``decoder.up_1.up``, ``attender.conv1``, ``refiner.blocks.j``, ``ref_outc``), so release files load strictly.

Two numerically equivalent execution paths exist:

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

import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from upbench.checkpoints import WeightSource
from upbench.dtypes import parse_dtype
from upbench.errors import UpbenchError

from . import register
from .base import Upsampler, as_size
from .layers import LayerNorm2d

CONFIG_DIR = Path(__file__).with_name("uplift_configs")
CONFIG_NAMES = ("uplift_dinov2-s14", "uplift_dinov3-splus16", "uplift_sd1.5vae")
DEFAULT_CONFIG_FOR_PATCH = {14: "uplift_dinov2-s14", 16: "uplift_dinov3-splus16", 8: "uplift_sd1.5vae"}

# ----------------------------------------------------------------------------------------------------------------
# Local Attender neighbourhoods: (dy, dx) per logit channel, in channel order (row-major: dy, then dx ascending).
# ----------------------------------------------------------------------------------------------------------------
ATTENDER_OFFSETS: Dict[int, Tuple[Tuple[int, int], ...]] = {
    # plus shape
    5: ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)),
    # full 3x3
    9: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
    # diamond of radius 2 (|dy| + |dx| <= 2)
    13: tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if abs(dy) + abs(dx) <= 2),
    # "star": 3x3 at dilation 1 united with 3x3 at dilation 2
    17: ((-2, -2), (-2, 0), (-2, 2), (-1, -1), (-1, 0), (-1, 1), (0, -2), (0, -1), (0, 0), (0, 1), (0, 2),
         (1, -1), (1, 0), (1, 1), (2, -2), (2, 0), (2, 2)),
    # full 5x5
    25: tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)),
}


def attender_offsets(n: int) -> Tuple[Tuple[int, int], ...]:
    try:
        return ATTENDER_OFFSETS[int(n)]
    except KeyError:
        raise UpbenchError(f"UPLiFT: unsupported attender size {n} (supported: {sorted(ATTENDER_OFFSETS)})") from None


def attender_padding(n: int) -> int:
    return max(max(abs(dy), abs(dx)) for dy, dx in attender_offsets(n))


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
            raise UpbenchError(f"UPLiFT: unknown config '{name}' (neither a file nor one of {', '.join(CONFIG_NAMES)})")
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


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------
def residual_auto(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b + a`` where the channel counts may differ: extra channels of ``a`` are dropped, missing ones are zero."""
    ca, cb = a.shape[1], b.shape[1]
    if ca == cb:
        return b + a
    if ca > cb:
        return b + a[:, :cb]
    return b + F.pad(a, (0, 0, 0, 0, 0, cb - ca))


def _residual_auto_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """In-place ``residual_auto`` on a freshly computed ``b`` (inference path)."""
    ca, cb = a.shape[1], b.shape[1]
    if ca >= cb:
        return b.add_(a[:, :cb] if ca > cb else a)
    b[:, :ca].add_(a)
    return b


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return LayerNorm2d(channels)
    raise UpbenchError(f"UPLiFT: unsupported norm '{kind}' (supported: batch, layer)")


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(conv(x))`` as a single conv (eval-mode BatchNorm)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        b = b + conv.bias * scale
    return w, b


def _conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: Any,
          fast: bool) -> torch.Tensor:
    """F.conv2d; in the inference path a 1x1 conv on a channels-last map is one GEMM with a fused bias, and the
    weights follow the activations' dtype (reduced-precision compute)."""
    if w.dtype != x.dtype:
        w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
    if (fast and w.shape[-2:] == (1, 1) and stride == 1 and padding in ((0, 0), 0)
            and x.permute(0, 2, 3, 1).is_contiguous()):
        return F.linear(x.permute(0, 2, 3, 1), w.flatten(1), b).permute(0, 3, 1, 2)
    return F.conv2d(x, w, b, stride, padding)


# Inference path: a channel concatenation kept as its pieces, (tensor, channels) each; ``None`` = all zeros.
Parts = List[Tuple[Optional[torch.Tensor], int]]


def _conv_parts(parts: Parts, w: torch.Tensor, b: Optional[torch.Tensor], padding: Any) -> torch.Tensor:
    """``conv(cat(parts), w, b)`` as a sum of convs over the pieces' weight slices: the same numbers without
    writing the concatenated map (all-zero pieces contribute nothing and are skipped)."""
    y, c0 = None, 0
    for t, n in parts:
        if t is not None:
            wi = w[:, c0:c0 + n]
            if y is None:
                y = _conv(t, wi, b, 1, padding, True)
            else:
                y.add_(_conv(t, wi, None, 1, padding, True))
        c0 += n
    if y is None:
        raise UpbenchError("UPLiFT: a concatenation of zero maps only")
    return y


def _residual_parts_(parts: Parts, y: torch.Tensor) -> torch.Tensor:
    """In-place ``residual_auto(cat(parts), y)``: channel c of y gets channel c of the concatenation, c < both."""
    cb, c0 = y.shape[1], 0
    for t, n in parts:
        if c0 >= cb:
            break
        m = min(n, cb - c0)
        if t is not None:
            src = t if m == n else t[:, :m]
            (y if (c0, m) == (0, cb) else y[:, c0:c0 + m]).add_(src)
        c0 += n
    return y


def _linear_residual(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], res: Parts) -> torch.Tensor:
    """Inference path: 1x1 conv of a channels-last map plus ``residual_auto(cat(res), .)`` as one GEMM that
    accumulates onto (residual + bias), instead of adding the residual in another pass over the output."""
    B, cin, H, W = x.shape
    w = w.to(x.dtype).flatten(1)
    cout = w.shape[0]
    out = torch.empty((B, H, W, cout), dtype=x.dtype, device=x.device)
    b = out.new_zeros(cout) if b is None else b.to(x.dtype)
    t0, n0 = res[0]
    if t0 is not None and n0 >= cout:
        torch.add(t0.permute(0, 2, 3, 1)[..., :cout], b, out=out)
    else:
        out.copy_(b.expand(out.shape))
        c0 = 0
        for t, n in res:
            m = min(n, cout - c0)
            if m <= 0:
                break
            if t is not None:
                out[..., c0:c0 + m].add_(t.permute(0, 2, 3, 1)[..., :m])
            c0 += n
    out.view(-1, cout).addmm_(x.permute(0, 2, 3, 1).reshape(-1, cin), w.t())
    return out.permute(0, 3, 1, 2)


def _run_convs(seq: nn.Sequential, x: Union[torch.Tensor, Parts], stride: int, fast: bool,
               residual: Optional[Parts] = None) -> torch.Tensor:
    """Run a conv/norm/ReLU Sequential; the first conv may be strided (then evaluated only at every
    ``stride``-th pixel, starting at the top-left one).  ``fast`` folds BatchNorm and uses in-place ReLUs; there
    ``x`` may also be :data:`Parts` (stride 1), read by the first conv without concatenating, and ``residual``
    (:data:`Parts`) is added to the output (see :func:`residual_auto`)."""
    mods = list(seq)
    i, first = 0, True
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d):
            s = stride if first else 1
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            w, b, skip = m.weight, m.bias, 1
            if fast and isinstance(nxt, nn.BatchNorm2d):
                (w, b), skip = _folded(m, nxt), 2
            if (fast and residual is not None and i + skip == len(mods) and w.shape[-2:] == (1, 1) and s == 1
                    and not isinstance(x, list) and x.permute(0, 2, 3, 1).is_contiguous()):
                return _linear_residual(x, w, b, residual)
            if first and isinstance(x, list):
                x = _conv_parts(x, w, b, m.padding)
            else:
                x = _conv(x, w, b, s, m.padding, fast) if (s != 1 or fast) else m(x)
            first = False
            i += skip
            continue
        elif isinstance(m, nn.ReLU):
            x = F.relu_(x) if fast else F.relu(x)
        elif isinstance(m, LayerNorm2d) and fast:
            x = m.forward_fast(x)
        else:
            x = m(x)
        i += 1
    return x if residual is None else _residual_parts_(residual, x)


class SingleConv(nn.Module):
    """Conv3x3 (no bias) -> norm -> ReLU -> Conv1x1 (bias), plus ``residual_auto(input, .)``."""

    def __init__(self, in_ch: int, h1: int, norm: str = "batch", residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, h1, 3, padding=1, bias=False), make_norm(norm, h1), nn.ReLU(inplace=True),
            nn.Conv2d(h1, h1, 1),
        )

    def forward(self, x: Union[torch.Tensor, Parts], stride: int = 1, fast: bool = False) -> torch.Tensor:
        if not self.residual:
            return _run_convs(self.conv, x, stride, fast)
        if fast:
            res = x if isinstance(x, list) else [(x[:, :, ::stride, ::stride] if stride != 1 else x, x.shape[1])]
            return _run_convs(self.conv, x, stride, fast, residual=res)
        xr = x[:, :, ::stride, ::stride] if stride != 1 else x
        return residual_auto(xr, _run_convs(self.conv, x, stride, fast))


class DoubleConv(SingleConv):
    """Conv3x3 -> norm -> ReLU -> Conv3x3 -> norm -> ReLU -> Conv1x1 (bias), plus the auto residual."""

    def __init__(self, in_ch: int, h1: int, h2: int, norm: str = "batch", residual: bool = True):
        nn.Module.__init__(self)
        self.residual = residual
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, h1, 3, padding=1, bias=False), make_norm(norm, h1), nn.ReLU(inplace=True),
            nn.Conv2d(h1, h2, 3, padding=1, bias=False), make_norm(norm, h2), nn.ReLU(inplace=True),
            nn.Conv2d(h2, h2, 1),
        )


class BlockGroup(nn.Module):
    """``count`` blocks of one type chained; block ``i`` has width ``hc[i]``."""

    def __init__(self, in_ch: int, cfg: Mapping[str, Any]):
        super().__init__()
        kind, norm, count = cfg.get("block", "SingleConv"), cfg.get("norm", "batch"), int(cfg.get("count", 1))
        hc = list(cfg["hc"])
        if len(hc) < count:
            raise UpbenchError(f"UPLiFT: block group needs {count} widths, config gives hc={hc}")
        blocks = []
        for i in range(count):
            if kind == "SingleConv":
                blocks.append(SingleConv(in_ch, hc[i], norm))
            elif kind == "DoubleConv":
                blocks.append(DoubleConv(in_ch, hc[i], hc[i], norm))
            else:
                raise UpbenchError(f"UPLiFT: unsupported block type '{kind}' (supported: SingleConv, DoubleConv)")
            in_ch = hc[i]
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor, last_stride: int = 1, fast: bool = False) -> torch.Tensor:
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            x = blk(x, stride=last_stride if i == n - 1 else 1, fast=fast)
        return x


class UpBlock(nn.Module):
    """ConvTranspose2d(c, c, k=s=factor) plus an ``UpsamplingBilinear2d`` (align_corners=True) residual."""

    def __init__(self, channels: int, cfg: Mapping[str, Any]):
        super().__init__()
        op = cfg.get("up_op", "tconv")
        if op != "tconv":
            raise UpbenchError(f"UPLiFT: unsupported up_op '{op}' (supported: tconv)")
        self.factor = int(cfg.get("factor", 2))
        self.up = nn.ConvTranspose2d(channels, channels, self.factor, stride=self.factor)
        residual = cfg.get("residual", "bilinear")
        if residual not in ("bilinear", "none", None):
            raise UpbenchError(f"UPLiFT: unsupported up residual '{residual}' (supported: bilinear, none)")
        self.res = nn.UpsamplingBilinear2d(scale_factor=self.factor) if residual == "bilinear" else None

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if fast:
            w, b = self.up.weight, self.up.bias
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
            y = F.conv_transpose2d(x, w, b, self.up.stride, self.up.padding, self.up.output_padding,
                                   self.up.groups, self.up.dilation)
        else:
            y = self.up(x)
        if self.res is None:
            return y
        r = self.res(x)
        return _residual_auto_(r, y) if fast else residual_auto(r, y)


def _resize_nearest(f: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    return F.interpolate(f, size=size, mode="nearest")


def noise_and_combine(x: torch.Tensor, f: Optional[torch.Tensor], ncat_c: int, ncat_s: float) -> torch.Tensor:
    """cat[x, f nearest-resized to x's size, ncat_c channels of N(0,1)*ncat_s] along channels."""
    parts = [x]
    if f is not None:
        parts.append(_resize_nearest(f, tuple(x.shape[-2:])))
    if ncat_c > 0:
        shape = (x.shape[0], ncat_c, x.shape[2], x.shape[3])
        if ncat_s == 0:
            parts.append(x.new_zeros(shape))
        else:
            parts.append(torch.randn(shape, dtype=x.dtype, device=x.device) * ncat_s)
    if len(parts) == 1:
        return x
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
    return torch.cat(parts, 1)


def noise_and_combine_parts(x: torch.Tensor, f: Optional[torch.Tensor], ncat_c: int, ncat_s: float) -> Parts:
    """:func:`noise_and_combine` as :data:`Parts` (inference path): nothing is concatenated; zero noise is ``None``."""
    parts: Parts = [(x, x.shape[1])]
    if f is not None:
        fr = _resize_nearest(f, tuple(x.shape[-2:]))
        parts.append((fr.to(x.dtype), fr.shape[1]))
    if ncat_c > 0:
        noise = None
        if ncat_s != 0:
            noise = torch.randn((x.shape[0], ncat_c, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device) * ncat_s
            noise = noise.contiguous(memory_format=torch.channels_last)
        parts.append((noise, ncat_c))
    return parts


class UPLiFTEncoder(nn.Module):
    """``down_steps + 1`` block groups; every shipped config has ``down_op: none`` (full resolution throughout)."""

    def __init__(self, cfg: Mapping[str, Any], in_ch: int = 3):
        super().__init__()
        self.depth = int(cfg.get("down_steps", 4)) + 1
        widths = []
        for k in range(self.depth):
            if k > 0:
                down = cfg.get(f"down_{k}", {}) or {}
                if down.get("down_op", "none") not in ("none", None):
                    raise UpbenchError(f"UPLiFT: unsupported encoder down_op '{down.get('down_op')}' (supported: none)")
            grp = BlockGroup(in_ch, cfg[f"block_{k}"])
            self.add_module(f"block_{k}", grp)
            in_ch = grp.out_channels
            widths.append(in_ch)
        self.widths = widths

    def forward(self, img: torch.Tensor, last_stride: int = 1, fast: bool = False) -> List[torch.Tensor]:
        outs, x = [], img
        for k in range(self.depth):
            x = getattr(self, f"block_{k}")(x, last_stride=last_stride if k == self.depth - 1 else 1, fast=fast)
            outs.append(x)
        return outs


class UPLiFTDecoder(nn.Module):
    """cat(x, enc[-1]) -> block_0 -> [up_i -> cat(., enc[-1-i]) -> block_i] for i = 1..up_steps -> guide map."""

    def __init__(self, cfg: Mapping[str, Any], in_channels: int, enc_widths: Sequence[int]):
        super().__init__()
        self.up_steps = int(cfg.get("up_steps", 1))
        self.ncat_c, self.ncat_s = int(cfg.get("ncat_c", 0)), float(cfg.get("ncat_s", 1))
        resample = cfg.get("enc_resample", "nearest")
        if resample != "nearest":
            raise UpbenchError(f"UPLiFT: unsupported enc_resample '{resample}' (supported: nearest)")
        if self.up_steps + 1 > len(enc_widths):
            raise UpbenchError("UPLiFT: decoder has more up steps than the encoder has outputs")
        self.block_0 = BlockGroup(in_channels + enc_widths[-1] + self.ncat_c, cfg["block_0"])
        c = self.block_0.out_channels
        self.factor = 1
        for i in range(1, self.up_steps + 1):
            up = UpBlock(c, cfg[f"up_{i}"])
            self.add_module(f"up_{i}", up)
            self.factor *= up.factor
            blk = BlockGroup(c + enc_widths[-1 - i] + self.ncat_c, cfg[f"block_{i}"])
            self.add_module(f"block_{i}", blk)
            c = blk.out_channels
        self.out_channels = c

    def forward(self, x: torch.Tensor, enc: Sequence[torch.Tensor], fast: bool = False) -> torch.Tensor:
        combine = noise_and_combine_parts if fast else noise_and_combine
        x = self.block_0(combine(x, enc[-1], self.ncat_c, self.ncat_s), fast=fast)
        for i in range(1, self.up_steps + 1):
            x = getattr(self, f"up_{i}")(x, fast=fast)
            x = getattr(self, f"block_{i}")(combine(x, enc[-1 - i], self.ncat_c, self.ncat_s), fast=fast)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Local Attender
# ----------------------------------------------------------------------------------------------------------------
def local_attend_reference(x: torch.Tensor, attn: torch.Tensor, offsets: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Straightforward form: out = sum_d attn[:, d] * upsample_nearest(shift_d(replicate_pad(x))).

    x (B, C, h, w) low-res values; attn (B, n, H, W) softmaxed weights, H = I*h, W = J*w."""
    B, C, h, w = x.shape
    H, W = attn.shape[-2:]
    I, J = H // h, W // w
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    nb = torch.stack([xp[:, :, p + dy:p + dy + h, p + dx:p + dx + w] for dy, dx in offsets], 1)  # B,n,C,h,w
    nb = nb.repeat_interleave(I, dim=3).repeat_interleave(J, dim=4)  # B,n,C,H,W
    return (attn.unsqueeze(2) * nb).sum(1)


def _offset_runs(offsets: Sequence[Tuple[int, int]]) -> Tuple[Tuple[int, int, int, int, int], ...]:
    """Split the neighbourhood into runs ``(first channel, count, dy, first dx, dx step)``: consecutive channels on one
    low-res row with evenly spaced dx, so that a run's neighbours are one strided view of the map."""
    runs: List[Tuple[int, int, int, int, int]] = []
    for d, (dy, dx) in enumerate(offsets):
        if runs:
            d0, k, rdy, dx0, st = runs[-1]
            step = dx - dx0 if k == 1 else st
            if rdy == dy and step > 0 and dx == dx0 + k * step:
                runs[-1] = (d0, k + 1, dy, dx0, step)
                continue
        runs.append((d, 1, dy, dx, 1))
    return tuple(runs)


def _cell_weights(attn_last: torch.Tensor, I: int, J: int) -> torch.Tensor:
    """(B, H, W, n) softmax weights -> (B, h, w, J*I, n): the J x I sub-pixels of each low-res cell together."""
    B, H, W, n = attn_last.shape
    h, w = H // I, W // J
    return attn_last.reshape(B, h, I, w, J, n).permute(0, 1, 3, 4, 2, 5).reshape(B, h, w, J * I, n)


@functools.lru_cache(maxsize=32)
def _resize_taps(n_in: int, n_out: int) -> Tuple[Tuple[int, ...], Tuple[int, ...], torch.Tensor]:
    """One axis of :func:`_resize_bilinear_aa` as taps: output o reads inputs [first[o], last[o]) with weights
    ``taps[o, :last[o] - first[o]]`` (float32, zero-padded).  The weights are taken from PyTorch itself: one-hot
    columns resized along that axis (the other axis keeps its size, which the filter leaves unchanged; it is kept
    at 2 or more, as a width of 1 does not resize like the rest), so they are exactly the ones the plain resize uses."""
    blk = max(2, min(n_in, max(1, (1 << 22) // max(n_in, n_out))))
    cols = []
    for k0 in range(0, n_in, blk):
        k1 = min(n_in, k0 + blk)
        onehot = torch.zeros((1, 1, n_in, max(2, k1 - k0)))
        onehot[0, 0, torch.arange(k0, k1), torch.arange(k1 - k0)] = 1
        cols.append(_resize_bilinear_aa(onehot, (n_out, onehot.shape[-1]))[0, 0, :, :k1 - k0])
    m = torch.cat(cols, 1)  # (n_out, n_in)
    nz = m != 0
    first = nz.to(torch.int8).argmax(1)
    last = n_in - nz.flip(1).to(torch.int8).argmax(1)
    span = int((last - first).max())
    idx = (first[:, None] + torch.arange(span)).clamp_(max=n_in - 1)
    taps = torch.where(torch.arange(span) < (last - first)[:, None], m.gather(1, idx), torch.zeros(()))
    return tuple(first.tolist()), tuple(last.tolist()), taps


def _taps_dense(first: Sequence[int], last: Sequence[int], taps: torch.Tensor, o0: int, o1: int,
                k0: int, k1: int) -> torch.Tensor:
    """Rows [o0, o1), input columns [k0, k1) of the dense weight matrix."""
    m = torch.zeros((o1 - o0, k1 - k0), dtype=taps.dtype)
    for o in range(o0, o1):
        m[o - o0, first[o] - k0:last[o] - k0] = taps[o, :last[o] - first[o]]
    return m


@functools.lru_cache(maxsize=32)
def _resize_csr(n_in: int, n_out: int) -> torch.Tensor:
    """The whole (n_out, n_in) weight matrix of :func:`_resize_taps`, sparse CSR."""
    first, last, taps = _resize_taps(n_in, n_out)
    count = torch.tensor(last) - torch.tensor(first)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
    keep = torch.arange(taps.shape[1]) < count[:, None]
    col = (torch.tensor(first)[:, None] + torch.arange(taps.shape[1]))[keep]
    with warnings.catch_warnings():  # CSR support is flagged as beta; the matmul used here is long-standing
        warnings.simplefilter("ignore")
        # int32 indices: what the CPU sparse matmul uses, so it does not convert them on every call
        return torch.sparse_csr_tensor(crow.int(), col.int(), taps[keep], (n_out, n_in))


# Cell-major scratch block of :meth:`_NeighbourMix.full` (elements); timings are flat from 2^19 to 2^21.
_CELL_BLOCK_ELEMS = 1 << 20


class _NeighbourMix:
    """The Local Attender's convex combination, low-res cell by low-res cell.

    All J x I sub-pixels of a cell mix the same n neighbours, so a cell's output is a (J*I x n) @ (n x C) product.
    Away from the left / right borders, each run of neighbours on one row (see :func:`_offset_runs`) is an
    overlapping strided *view* of the channels-last map (batch stride = one pixel), so a low-res row costs one
    batched matmul per run, nothing is gathered or padded, and the partial sums stay in cache.  Replication padding
    is index clamping: the rows of a run are clamped, and the few border cells gather their clamped neighbours.
    Rows come out cell-major, (w, J, I, C)."""

    def __init__(self, x: torch.Tensor, a_cells: torch.Tensor, offsets: Sequence[Tuple[int, int]]):
        self.B, self.C, self.h, self.w = B, C, h, w = x.shape
        dtype = torch.result_type(a_cells, x)
        xl = x.to(dtype).permute(0, 2, 3, 1)  # B, h, w, C
        self.x = xl if xl.is_contiguous() else xl.contiguous()
        self.a = a_cells.to(dtype)
        self.runs = _offset_runs(offsets)
        dys = torch.tensor([dy for dy, _ in offsets], device=x.device)
        dxs = torch.tensor([dx for _, dx in offsets], device=x.device)
        left, right = max(0, -int(dxs.min())), max(0, int(dxs.max()))
        if w > left + right:
            self.inner = (left, w - right)
            segments = [(0, left), (w - right, w)]
        else:
            self.inner = (0, 0)
            segments = [(0, w)]
        rows = (torch.arange(h, device=x.device)[:, None] + dys).clamp_(0, h - 1)  # h, n
        self.edges = []  # (first cell, past-the-last cell, flat neighbour indices per row (h, cells * n))
        for c0, c1 in segments:
            if c1 > c0:
                cols = (torch.arange(c0, c1, device=x.device)[:, None] + dxs).clamp_(0, w - 1)  # cells, n
                self.edges.append((c0, c1, (rows[:, None, :] * w + cols).reshape(h, -1)))

    def row(self, b: int, r: int, out: torch.Tensor) -> torch.Tensor:
        """Low-res row ``r`` of batch item ``b`` into ``out`` (w, J*I, C)."""
        x, h, C = self.x, self.h, self.C
        a = self.a[b, r]
        j0, j1 = self.inner
        if j1 > j0:
            sb, sr, sc, _ = x.stride()
            base = x.storage_offset() + b * sb + j0 * sc
            o, ai = out[j0:j1], a[j0:j1]
            for q, (d0, k, dy, dx0, st) in enumerate(self.runs):
                rr = min(max(r + dy, 0), h - 1)
                nb = x.as_strided((j1 - j0, k, C), (sc, st * sc, 1), base + rr * sr + dx0 * sc)
                if q == 0:
                    torch.bmm(ai[:, :, d0:d0 + k], nb, out=o)
                else:
                    o.baddbmm_(ai[:, :, d0:d0 + k], nb)
        for c0, c1, idx in self.edges:
            nb = x[b].view(-1, C).index_select(0, idx[r]).view(c1 - c0, -1, C)
            torch.bmm(a[c0:c1], nb, out=out[c0:c1])
        return out

    def full(self, I: int, J: int, chunk_elems: int) -> torch.Tensor:
        """The whole (B, C, H, W) map in channels-last memory format."""
        B, C, h, w = self.B, self.C, self.h, self.w
        out = torch.empty((B, h, I, w, J, C), dtype=self.x.dtype, device=self.x.device)
        rows = max(1, min(h, chunk_elems // max(1, w * I * J * C)))
        buf = torch.empty((rows, w, J, I, C), dtype=out.dtype, device=out.device)
        for b in range(B):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                for r in range(r0, r1):
                    self.row(b, r, buf[r - r0].view(w, J * I, C))
                out[b, r0:r1].copy_(buf[:r1 - r0].permute(0, 3, 1, 2, 4))  # cell-major -> row-major
        return out.view(B, h * I, w * J, C).permute(0, 3, 1, 2)

    def resized(self, I: int, J: int, size: Tuple[int, int], rows_per_block: int = 8) -> torch.Tensor:
        """``_resize_bilinear_aa(full map, size)`` without ever holding the full map (channels-last output).

        The resize is separable.  Horizontal pass: each finished high-res row (a strided (W, C) view of the cell-major
        row) times the sparse (Wo x W) weight matrix, into a small rolling buffer of resized rows.  Vertical pass:
        each output row is a weighted sum of the few buffered rows it covers, written as soon as they exist."""
        B, C, h, w = self.B, self.C, self.h, self.w
        H, W = h * I, w * J
        Ho, Wo = size
        dev, dt = self.x.device, self.x.dtype
        lo_h, hi_h, taps_h = _resize_taps(H, Ho)
        mw = _resize_csr(W, Wo).to(device=dev, dtype=dt)
        # vertical pass in blocks of output rows: one small dense matmul each (zero weights outside a row's taps)
        blocks = []
        for o0 in range(0, Ho, rows_per_block):
            o1 = min(Ho, o0 + rows_per_block)
            lo, hi = min(lo_h[o0:o1]), max(hi_h[o0:o1])
            blocks.append((o0, o1, lo, hi, _taps_dense(lo_h, hi_h, taps_h, o0, o1, lo, hi).to(device=dev, dtype=dt)))
        keep_from = [blk[2] for blk in blocks] + [H]  # first input row that any block >= q still needs
        for q in range(len(blocks) - 1, -1, -1):
            keep_from[q] = min(keep_from[q], keep_from[q + 1])
        cap = 2 * (max(blk[3] - blk[2] for blk in blocks) + I)
        out = torch.empty((B, Ho, Wo, C), dtype=dt, device=dev)
        zbuf = torch.empty((cap, Wo * C), dtype=dt, device=dev)  # horizontally resized rows [base, done)
        cell = torch.empty((w, J, I, C), dtype=dt, device=dev)
        for b in range(B):
            base = done = q = 0
            for r in range(h):
                if done + I - base > cap:  # slide the rows still needed to the front
                    k = keep_from[q]
                    if done > k:
                        zbuf[:done - k].copy_(zbuf[k - base:done - base].clone())
                    base = k
                self.row(b, r, cell.view(w, J * I, C))
                for i in range(I):
                    zbuf[done - base].view(Wo, C).addmm_(mw, cell[:, :, i].reshape(W, C), beta=0)
                    done += 1
                while q < len(blocks) and blocks[q][3] <= done:
                    o0, o1, lo, hi, mh = blocks[q]
                    torch.mm(mh, zbuf[lo - base:hi - base], out=out[b, o0:o1].view(o1 - o0, Wo * C))
                    q += 1
        return out.permute(0, 3, 1, 2)


def local_attend_fast(x: torch.Tensor, attn_last: torch.Tensor, offsets: Sequence[Tuple[int, int]],
                      size: Optional[Tuple[int, int]] = None, chunk_elems: int = _CELL_BLOCK_ELEMS) -> torch.Tensor:
    """Same result as :func:`local_attend_reference` (followed by ``_resize_bilinear_aa(., size)`` when ``size`` is
    given and differs from the native size), without high-resolution copies of the neighbours; see
    :class:`_NeighbourMix`.  ``attn_last`` is (B, H, W, n) (channels-last softmax weights).  Returns a (B, C, H, W)
    tensor in channels-last memory format; ``chunk_elems`` bounds the cell-major scratch block."""
    h, w = x.shape[-2:]
    H, W = attn_last.shape[1:3]
    return _attend(x, _cell_weights(attn_last, H // h, W // w), offsets, H // h, W // w, size, chunk_elems)


def _attend(x: torch.Tensor, a_cells: torch.Tensor, offsets: Sequence[Tuple[int, int]], I: int, J: int,
            size: Optional[Tuple[int, int]], chunk_elems: int = _CELL_BLOCK_ELEMS) -> torch.Tensor:
    mix = _NeighbourMix(x, a_cells, offsets)
    if size is None or tuple(size) == (x.shape[-2] * I, x.shape[-1] * J):
        return mix.full(I, J, chunk_elems)
    if size[1] == 1:  # not separable there (see _resize_bilinear_aa)
        return _resize_bilinear_aa(mix.full(I, J, chunk_elems), size)
    return mix.resized(I, J, tuple(size))


class LocalAttender(nn.Module):
    """Logits = Conv1x1(guide) + guide[:, :n]; softmax over the n neighbours; convex combination of the
    replication-padded low-res neighbours of each high-res pixel's parent cell."""

    def __init__(self, in_channels: int, num_connected: int = 17, conv_res: bool = True, low_mem: bool = False):
        super().__init__()
        self.offsets = attender_offsets(num_connected)
        self.n = num_connected
        self.conv_res = conv_res
        self.low_mem = low_mem
        self.conv1 = nn.Conv2d(in_channels, num_connected, 1)

    def logits(self, guide: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if not fast:
            z = self.conv1(guide)
            return residual_auto(guide, z) if self.conv_res else z
        if self.conv_res and guide.permute(0, 2, 3, 1).is_contiguous():
            return _linear_residual(guide, self.conv1.weight, self.conv1.bias, [(guide, guide.shape[1])])
        z = _conv(guide, self.conv1.weight, self.conv1.bias, 1, 0, True)
        return _residual_auto_(guide, z) if self.conv_res else z

    def forward(self, x: torch.Tensor, guide: torch.Tensor, fast: bool = False,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``size`` (fast path only): resize the result to it (antialiased bilinear) on the fly."""
        (h, w), (H, W) = x.shape[-2:], guide.shape[-2:]
        if H % h or W % w:
            raise UpbenchError(f"UPLiFT attender: high-res size {(H, W)} is not an integer multiple of {(h, w)}")
        if fast and guide.dtype != x.dtype:
            guide = guide.to(x.dtype)  # logits, softmax and the mix at the features' precision
        z = self.logits(guide, fast)
        if fast:
            a = torch.softmax(_cell_weights(z.permute(0, 2, 3, 1), H // h, W // w), dim=-1)
            return _attend(x, a, self.offsets, H // h, W // w, size)
        return local_attend_reference(x, torch.softmax(z, dim=1), self.offsets)


# ----------------------------------------------------------------------------------------------------------------
# the model + harness adapter
# ----------------------------------------------------------------------------------------------------------------
def _resize_bilinear_aa(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """torchvision ``resize`` (bilinear, antialias on) for float tensors."""
    size = tuple(int(s) for s in size)
    if size[1] == 1:
        # PyTorch resizes a contiguous map to width 1 differently from a channels-last one (the former is not the
        # separable filter); the reference path and the official code see contiguous maps, so use that layout
        x = x.contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _hf(name: str) -> WeightSource:
    return WeightSource(hf_repo=f"UPLiFT-upsampler/{name}", hf_file=f"{name}.safetensors", licence="MIT",
                        notes=f"official UPLiFT release ({name}); plain safetensors state_dict, strict load")


@register("uplift")
class UPLiFT(Upsampler):
    """UPLiFT with the official module layout.

    ``UPLiFT(in_channels=384, patch_size=14, config=None, iters=None, low_mem=False, dtype=None,
    image_mean=None, image_std=None, fast=True, compute_dtype=None)``

    * ``config``: a config name (``uplift_dinov2-s14``, ``uplift_dinov3-splus16``, ``uplift_sd1.5vae``), a YAML path,
      or a mapping (a whole config or just its ``uplift:`` section).  Default: chosen from ``patch_size``.
    * ``iters``: fixed number of 2x steps for :meth:`forward`; ``None`` picks it from the requested output size.
    * ``image_mean`` / ``image_std``: the normalisation the guidance image must carry (ImageNet for DINO backbones;
      the official code uses 0.5 / 0.5 for non-DINO timm backbones).
    * ``fast``: use the inference path in eval mode (folded BatchNorm, channels-last, no concatenations, a
      row-by-row attender with the output resize folded in; same numbers, see the module docstring).
    * ``compute_dtype``: opt-in reduced precision for that path, e.g. ``"bfloat16"``: the encoder and decoder
      (convolutions, ~85% of the time) run in it, while the attender's logits, softmax and mix stay in the
      features' precision, as does the output.  ``None`` (default): the parameters' dtype throughout.

    Official-style API: :meth:`enable_iterative`, :meth:`return_steps`, :meth:`forward_official`
    (``model(img, feats, outsize)`` semantics); harness API: :meth:`forward`, :meth:`forward_steps`.
    """

    official_methods = ("UPLiFT",)
    pretrained_sources = {
        "uplift_dinov2-s14": _hf("uplift_dinov2-s14"),
        "uplift_dinov3-splus16": _hf("uplift_dinov3-splus16"),
        "uplift_sd1.5vae": _hf("uplift_sd1.5vae"),
        # trained here for the `demo` backbone (EfficientNet-Lite0 blocks.4, C=112, stride 16); see README
        "demo": WeightSource(package_file="uplift_demo.safetensors", licence="MIT",
                             notes="upbench train on builtin:skimage photos; for backbone=demo only"),
    }
    checkpoint_prefixes = ("module.", "model.", "uplift.")
    checkpoint_wrappers = ("state_dict_ema", "state_dict", "model", "module", "net", "params")
    default_config: Optional[str] = None

    def __init__(self, in_channels: int = 384, patch_size: int = 14,
                 config: Union[None, str, os.PathLike, Mapping[str, Any]] = None, iters: Optional[int] = None,
                 low_mem: bool = False, dtype: Any = None, image_mean: Optional[Sequence[float]] = None,
                 image_std: Optional[Sequence[float]] = None, fast: bool = True, compute_dtype: Any = None,
                 cfg: Any = None, **_: Any):
        super().__init__()
        if config is None:
            config = cfg
        if config is None:
            config = self.default_config or DEFAULT_CONFIG_FOR_PATCH.get(int(patch_size), "uplift_dinov2-s14")
        full = load_config(config)
        ucfg = full["uplift"]
        self.config = full
        self.config_name = str(config) if isinstance(config, (str, os.PathLike)) else None
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
        self.attender = LocalAttender(self.decoder.out_channels, int(ucfg.get("attender", 17)), low_mem=self.low_mem)
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
        return self.fast and not self.training

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
                   config=constructor["cfg"], iters=constructor.get("iters"),
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
    default_config = "uplift_sd1.5vae"
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self, in_channels: int = 4, patch_size: int = 8, config: Any = None, **kwargs: Any):
        super().__init__(in_channels=in_channels, patch_size=patch_size, config=config, **kwargs)
