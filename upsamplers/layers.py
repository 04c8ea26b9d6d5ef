"""Small building blocks shared by the attention-based upsamplers (JAFAR, AnyUp, ...).

Module and parameter names follow the official checkpoints, so these blocks load the release files unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import as_size, query_chunk, use_device_path

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reflect_index(n: int, pad_before: int, pad_after: int, device) -> torch.Tensor:
    """Source index of every padded position along a side of ``n``: repeated reflection (period 2(n-1), as
    ``numpy.pad(mode="reflect")``); a side of 1 is repeated."""
    i = torch.arange(-pad_before, n + pad_after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - i)


def reflect_pad(x: torch.Tensor, pad: Tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pad, mode="reflect")`` of a (B, C, H, W) map (pad = left, right, top, bottom) that also works when
    a pad is as large as its side (feature grids of 1 or 2 cells), where PyTorch refuses: it then reflects
    repeatedly.  Identical to ``F.pad`` whenever ``F.pad`` works."""
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    if max(left, right) < w and max(top, bottom) < h:
        return F.pad(x, [left, right, top, bottom], mode="reflect")
    x = x.index_select(-1, _reflect_index(w, left, right, x.device))
    return x.index_select(-2, _reflect_index(h, top, bottom, x.device))


class ReflectConv2d(nn.Conv2d):
    """``nn.Conv2d(padding_mode="reflect")`` (same parameters and state-dict keys) whose padding also works on maps
    no larger than the padding (see :func:`reflect_pad`)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ph, pw = self.padding   # "same" padding, symmetric
        return F.conv2d(reflect_pad(input, (pw, pw, ph, ph)), weight, bias, self.stride, 0, self.dilation, self.groups)


def conv(in_ch: int, out_ch: int, kernel_size: int = 1, padding_mode: str = "reflect", bias: bool = False) -> nn.Conv2d:
    """Conv2d with "same" padding (``kernel_size // 2``) in the given padding mode, no bias by default.
    (A 1x1 conv has no padding, so its padding mode is irrelevant; "zeros" skips a no-op pad copy.)"""
    if kernel_size // 2 == 0:
        padding_mode = "zeros"
    if padding_mode == "reflect":
        return ReflectConv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode, bias=bias)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv -> GroupNorm -> SiLU -> Conv, plus the identity (channels in == out).

    ``layout="named"`` stores the layers as ``norm1/conv1/norm2/conv2`` (JAFAR's keys); ``layout="sequential"``
    packs them into one ``block`` Sequential (indices 0 = GN, 2 = conv, 3 = GN, 5 = conv; AnyUp's keys).
    """

    def __init__(self, channels: int, kernel_size: int = 1, num_groups: int = 8, layout: str = "named",
                 padding_mode: str = "reflect"):
        super().__init__()
        if layout not in ("named", "sequential"):
            raise ValueError(f"unknown ResBlock layout '{layout}'")
        self.layout = layout
        layers = [nn.GroupNorm(num_groups, channels), nn.SiLU(), conv(channels, channels, kernel_size, padding_mode),
                  nn.GroupNorm(num_groups, channels), nn.SiLU(), conv(channels, channels, kernel_size, padding_mode)]
        if layout == "sequential":
            self.block = nn.Sequential(*layers)
        else:
            self.norm1, self.conv1, self.norm2, self.conv2 = layers[0], layers[2], layers[3], layers[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "sequential":
            return x + self.block(x)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


def create_coordinate(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(1, h*w, 2) grid of (row, col) coordinates, each ``linspace(0, 1)``, meshgrid "ij", row-major order."""
    dtype = dtype or torch.get_default_dtype()
    rows = torch.linspace(0, 1, h, device=device, dtype=dtype)
    cols = torch.linspace(0, 1, w, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(1, h * w, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Split the last dim into halves (x1, x2) and return cat(-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(nn.Module):
    """2-D rotary position encoding with learnable frequencies ``freqs`` (2, dim).

    Initialisation: f = theta ** linspace(0, -1, dim // 4) * 2*pi; row 0 = [f, f, 0...0] (first half of the
    channels follows the row coordinate), row 1 = [0...0, f, f] (second half follows the column coordinate).
    ``angle = coords @ freqs``; ``out = x * cos(angle) + rotate_half(x) * sin(angle)``.
    """

    def __init__(self, dim: int, theta: float = 100.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"RoPE dim must be divisible by 4, got {dim}")
        f = (theta ** torch.linspace(0, -1, dim // 4)) * (2 * math.pi)
        freqs = torch.zeros(2, dim)
        freqs[0, : dim // 2] = torch.cat([f, f])
        freqs[1, dim // 2:] = torch.cat([f, f])
        self.freqs = nn.Parameter(freqs)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), coords (1 or B, N, 2)."""
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        angle = coords.to(work) @ self.freqs.to(work)
        out = x.to(work) * angle.cos() + rotate_half(x.to(work)) * angle.sin()
        return out.to(x.dtype)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a (B, dim, H, W) map with ``create_coordinate(H, W)`` on x's device."""
        b, c, h, w = x.shape
        work = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        coords = create_coordinate(h, w, device=x.device, dtype=work)
        flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return self(flat, coords).reshape(b, h, w, c).permute(0, 3, 1, 2)


class HeadAveragedAttention(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (same names, same init) with a forward that returns only the
    head-averaged attention weights, as ``need_weights=True, average_attn_weights=True`` does.

    Layout: packed ``in_proj_weight`` when kdim == vdim == embed_dim, else ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight``; ``in_proj_bias`` (3*embed_dim) and ``out_proj`` always. The value/output projections are
    kept for checkpoint compatibility (and parameter counts) but do not enter the returned weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: Optional[int] = None, vdim: Optional[int] = None,
                 bias: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.packed:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for p in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(p)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _proj(self, x: torch.Tensor, which: int) -> torch.Tensor:
        e = self.embed_dim
        if self.packed:
            weight = self.in_proj_weight[which * e:(which + 1) * e]
        else:
            weight = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[which]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[which * e:(which + 1) * e]
        return F.linear(x, weight, bias)

    def project_keys(self, key: torch.Tensor) -> torch.Tensor:
        """(B, Nk, kdim) -> per-head keys (B, heads, Nk, head_dim)."""
        b, n, _ = key.shape
        return self._proj(key, 1).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def project_queries(self, query: torch.Tensor) -> torch.Tensor:
        """(B, Nq, E) -> per-head queries scaled by 1/sqrt(head_dim): (B, heads, Nq, head_dim)."""
        b, n, _ = query.shape
        q = self._proj(query, 0).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        return q * math.sqrt(1.0 / float(self.head_dim))

    def weights(self, queries: torch.Tensor, keys: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Per-head queries / keys from :meth:`project_queries` / :meth:`project_keys`; attn_mask (Nq, Nk) or
        (B, Nq, Nk), bool, True = not allowed. Returns softmax(q k^T) averaged over heads: (B, Nq, Nk)."""
        logits = queries @ keys.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask[:, None]
            logits = logits.masked_fill(attn_mask, float("-inf"))
        return logits.softmax(dim=-1).mean(dim=1)


def default_chunk(num_queries: int, batch: int, num_heads: int, num_keys: int,
                  budget_elements: int = 1 << 25) -> int:
    """Query-chunk size keeping the per-head attention logits of one chunk under ``budget_elements``."""
    per_query = max(1, batch * num_heads * num_keys)
    return max(1, min(num_queries, budget_elements // per_query))


def chunked(num_queries: int, chunk: Optional[int]) -> Tuple[Tuple[int, int], ...]:
    """(start, stop) ranges covering ``range(num_queries)`` in chunks of ``chunk`` (all at once if None)."""
    if not chunk or chunk >= num_queries:
        return ((0, num_queries),)
    return tuple((s, min(s + chunk, num_queries)) for s in range(0, num_queries, chunk))


def attend(queries: torch.Tensor, values: torch.Tensor,
           weights_fn: Callable[[torch.Tensor, slice], torch.Tensor], chunk: Optional[int]) -> torch.Tensor:
    """out[:, s] = weights_fn(queries[..., s, :], s) @ values, chunk by chunk over the queries.

    queries (B, heads, Nq, d); values (B, Nk, C); weights_fn returns (B, n, Nk). Returns (B, Nq, C)."""
    b, nq = queries.shape[0], queries.shape[-2]
    out = values.new_empty(b, nq, values.shape[-1])
    for start, stop in chunked(nq, chunk):
        s = slice(start, stop)
        out[:, s] = weights_fn(queries[..., s, :], s) @ values
    return out


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm (ConvNeXt style): normalises over C of (B, C, H, W), eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class PooledCrossAttentionUpsampler:
    """Forward shared by JAFAR and AnyUp (AnyUp's code derives from JAFAR's): RoPE-encoded image features,
    queries pooled to the output size, keys pooled to the feature grid and modulated by the features, and
    attention weights applied to the raw features.  Subclasses define :meth:`queries` and :meth:`keys`.
    Mixed into an ``Upsampler`` that has ``image_encoder``, ``rope``, ``cross_decode`` and ``q_chunk_size``."""

    def check_features(self, features: torch.Tensor) -> None:
        pass

    def queries(self, enc: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def keys(self, enc: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size=None,
                q_chunk_size: Optional[int] = None) -> torch.Tensor:
        out_dtype = features.dtype
        ref = self.rope.freqs
        image, features = image.to(ref.device, ref.dtype), features.to(ref.device, ref.dtype)
        self.check_features(features)
        size = tuple(image.shape[-2:]) if output_size is None else as_size(output_size)
        enc = self.rope.forward_map(self.image_encoder(image))
        chunk = q_chunk_size if q_chunk_size is not None else self.q_chunk_size
        out = self.cross_decode(self.queries(enc, size), self.keys(enc, features), features, chunk)
        return out.to(out_dtype)

    def run_official(self, method: str, inputs, constructor):
        """``model(image, features, output_size[, q_chunk_size])``; no output_size means the image size."""
        size = inputs.get("output_size")
        size = tuple(size) if size is not None else None
        return {"output": self(inputs["image"], inputs["features"], size, q_chunk_size=inputs.get("q_chunk_size"))}


class CrossAttentionBlock(nn.Module):
    """Zero-padded 3x3 conv on the query map, RMS-normed queries and keys, head-averaged attention weights applied to
    the raw values (JAFAR, AnyUp).  ``mask(out_size, in_size, device, rows)`` -> bool (rows, h*w), True = masked,
    restricts each query to some keys (AnyUp's local window); ``None`` attends globally (JAFAR)."""

    def __init__(self, cross_attn: nn.Module, qk_dim: int, mask: Optional[Callable] = None):
        super().__init__()
        self.cross_attn = cross_attn  # has norm_q, norm_k and a HeadAveragedAttention ``attention``
        self.conv2d = nn.Conv2d(qk_dim, qk_dim, 3, padding=1, bias=False)
        self.mask = mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                q_chunk_size: Optional[int] = None) -> torch.Tensor:
        """query (B, D, H, W), key (B, D, h, w), value (B, C, h, w) -> (B, C, H, W)."""
        b, _, hq, wq = query.shape
        c, h, w = value.shape[1:]
        attn = self.cross_attn
        q = attn.attention.project_queries(attn.norm_q(self.conv2d(query).flatten(2).transpose(1, 2)))
        k = attn.attention.project_keys(attn.norm_k(key.flatten(2).transpose(1, 2)))
        v = value.flatten(2).transpose(1, 2)
        if use_device_path(q):
            out = self._attend_fused(q, k, v, (hq, wq), (h, w), q_chunk_size)
            return out.transpose(1, 2).reshape(b, c, hq, wq)
        if q_chunk_size is None:
            q_chunk_size = default_chunk(hq * wq, b, attn.attention.num_heads, h * w)

        def weights(qc: torch.Tensor, rows: slice) -> torch.Tensor:
            mask = None if self.mask is None else self.mask((hq, wq), (h, w), q.device, rows)
            return attn.attention.weights(qc, k, mask)

        out = attend(q, v, weights, q_chunk_size)
        return out.transpose(1, 2).reshape(b, c, hq, wq)

    def _attend_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_size: Tuple[int, int],
                      in_size: Tuple[int, int], chunk: Optional[int]) -> torch.Tensor:
        """Accelerator path.  Head-averaged weights applied to shared values equal the head average of per-head
        attention outputs, ``mean_h(softmax(q_h k_h^T)) v = mean_h(softmax(q_h k_h^T) v)``, so one fused
        ``scaled_dot_product_attention`` call (queries already scaled) replaces the explicit weights: the
        (queries x keys) logits are never stored, and the queries are split only when even that does not fit in
        free device memory.  q (B, heads, Nq, d), k (B, heads, Nk, d), v (B, Nk, C) -> (B, Nq, C)."""
        b, heads, nq, _ = q.shape
        nk, c = v.shape[1], v.shape[2]
        vh = v[:, None].expand(b, heads, nk, c)
        per_query = (3 * heads * c + (nk if self.mask is not None else 0) + heads * nk) * q.element_size() * b
        if chunk is None:   # 0: one piece, as the official code runs it
            chunk = query_chunk(nq, per_query, q.device)
        out = None
        for start, stop in chunked(nq, chunk):
            rows = slice(start, stop)
            allowed = None if self.mask is None else ~self.mask(out_size, in_size, q.device, rows)
            o = F.scaled_dot_product_attention(q[:, :, rows], k, vh, attn_mask=allowed, scale=1.0).mean(1)
            if start == 0 and stop == nq:
                return o
            if out is None:
                out = v.new_empty(b, nq, c)
            out[:, rows] = o
        return out
