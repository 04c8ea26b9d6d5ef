"""UPLiFT's convolutional building blocks (encoder, decoder, up-blocks), with two numerically equivalent paths.

* the reference path (``fast=False`` or training mode): the modules run as built;
* the inference path (``fast=True``): BatchNorm folded into the preceding conv, channels-last tensors, channel
  concatenations never written (the conv reading one is split by input channels, :data:`Parts`), 1x1 convs and their
  residual as one GEMM, and the last encoder block optionally evaluated on a stride (see :meth:`UPLiFT._enc_last_stride`).

Module names follow the official ``state_dict`` layout (``encoder.block_k.blocks.j.conv.N.*``, ``decoder.block_0``,
``decoder.up_1.up``), so release files load strictly.  The model itself is :mod:`.uplift`."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from upbench.errors import UpbenchError

from .layers import LayerNorm2d

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


def _tensor_key(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[Tuple[Any, ...]]:
    """Identity of the values of ``tensors`` (storage, in-place version, dtype, device): any load, optimiser step or
    move changes it.  None for inference-mode tensors, which have no version counter."""
    try:
        return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def _folded_once(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_folded`, computed once per set of weights and statistics and kept on the conv (an inference forward
    then launches nothing for BatchNorm); recomputed when any of them is loaded, updated, moved or cast."""
    key = _tensor_key((conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var))
    cached = conv.__dict__.get("_upbench_folded")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        folded = _folded(conv, bn)
    if key is not None:
        conv.__dict__["_upbench_folded"] = (key, folded)
    return folded


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
                (w, b), skip = _folded_once(m, nxt), 2
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
