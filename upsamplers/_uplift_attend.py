"""UPLiFT's Local Attender: every high-resolution vector is a softmax-weighted (convex) combination of the incoming
low-resolution vectors in a small neighbourhood of its parent cell.

Two numerically equivalent kernels: :func:`local_attend_reference` (gather the neighbours, broadcast them to high
resolution, weight and sum: the paper's figure), and the inference kernel :class:`_NeighbourMix`, which combines the
low-res neighbours of each cell with batched matmuls over strided views of the low-res map, one low-res row at a time,
optionally folding the final antialiased resize in so the native-size map is never held whole."""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from upbench.errors import UpbenchError
from upbench.transforms import resize

from .base import use_device_path
from ._uplift_blocks import _conv, _linear_residual, _residual_auto_, residual_auto

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
    except (KeyError, ValueError, TypeError):
        raise UpbenchError(f"UPLiFT: unsupported attender size {n!r} (supported: {sorted(ATTENDER_OFFSETS)}, or none "
                           "for no attender)") from None


def attender_padding(n: int) -> int:
    return max(max(abs(dy), abs(dx)) for dy, dx in attender_offsets(n))


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


def local_attend_vectorised(x: torch.Tensor, a_cells: torch.Tensor, offsets: Sequence[Tuple[int, int]], I: int,
                            J: int) -> torch.Tensor:
    """The accelerator kernel: the same convex combination with a number of launches that does not depend on the
    size (about nine), no loop over rows, nothing built on the host and no copies of the neighbours.

    The low-res map is replicate-padded once (channels-last, (B, h+2p, w+2p, C)) and flattened; cell (r, c) of item
    b is given the flat index t = b*P + r*(w+2p) + c (P = (h+2p)(w+2p)), so that its neighbour (dy, dx) sits at
    t + (p+dy)*(w+2p) + (p+dx): for every cell at once, a run of neighbours on one row (see :func:`_offset_runs`) is
    a single strided view, and the run's contribution one batched matmul, (J*I x k) @ (k x C) per cell.  Indices t
    that fall on padding get zero weights and are dropped.  ``a_cells`` (B, h, w, J*I, n) softmax weights (see
    :func:`_cell_weights`).  Returns (B, C, h*I, w*J) in channels-last memory format."""
    B, C, h, w = x.shape
    n = a_cells.shape[-1]
    dtype = torch.result_type(a_cells, x)
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    Hp, Wp = h + 2 * p, w + 2 * p
    P = Hp * Wp
    xp = F.pad(x.to(dtype), (p, p, p, p), mode="replicate").permute(0, 2, 3, 1).contiguous()  # B, Hp, Wp, C
    a = F.pad(a_cells.to(dtype), (0, 0, 0, 0, 0, 2 * p, 0, 2 * p)).view(B * P, J * I, n)  # zero weights on padding
    T = (B - 1) * P + (h - 1) * Wp + w  # cells up to the last real one; their neighbours stay inside xp
    out = torch.empty((B * P, J * I, C), dtype=dtype, device=x.device)
    base = xp.storage_offset()
    for q, (d0, k, dy, dx0, st) in enumerate(_offset_runs(offsets)):
        nb = xp.as_strided((T, k, C), (C, st * C, 1), base + ((p + dy) * Wp + p + dx0) * C)
        if q == 0:
            torch.bmm(a[:T, :, d0:d0 + k], nb, out=out[:T])
        else:
            out[:T].baddbmm_(a[:T, :, d0:d0 + k], nb)
    cells = out.view(B, Hp, Wp, J, I, C)[:, :h, :w]  # B, h, w, J, I, C
    hi = cells.permute(0, 1, 4, 2, 3, 5).reshape(B, h * I, w * J, C)  # the one copy: cell-major -> row-major
    return hi.permute(0, 3, 1, 2)


#: Local Attender kernels: ``auto`` (``rows`` on the CPU, ``vectorised`` elsewhere), ``rows`` (:class:`_NeighbourMix`,
#: the CPU kernel: few live bytes, output resize folded in), ``vectorised`` (:func:`local_attend_vectorised`: a fixed
#: number of launches, for GPUs), ``compile`` (the vectorised kernel through ``torch.compile``, on CUDA only; elsewhere
#: it runs as ``vectorised``)
ATTENDER_KERNELS = ("auto", "rows", "vectorised", "compile")


def check_kernel(kernel: str) -> str:
    k = str(kernel).lower()
    if k == "eager":
        k = "vectorised"
    if k not in ATTENDER_KERNELS:
        raise UpbenchError(f"UPLiFT: unknown attender kernel {kernel!r} (valid: {', '.join(ATTENDER_KERNELS)}, or "
                           "eager = vectorised); e.g. upsampler.kwargs.kernel=vectorised")
    return k


@functools.lru_cache(maxsize=None)
def _compiled_vectorised():
    return torch.compile(local_attend_vectorised, dynamic=True)


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """The kernel that actually runs for ``kernel`` on ``x``'s device (see :func:`.base.use_device_path`)."""
    if kernel == "auto":
        return "vectorised" if use_device_path(x) else "rows"
    if kernel == "compile" and x.device.type != "cuda":
        return "vectorised"
    return kernel


def _attend(x: torch.Tensor, a_cells: torch.Tensor, offsets: Sequence[Tuple[int, int]], I: int, J: int,
            size: Optional[Tuple[int, int]], chunk_elems: int = _CELL_BLOCK_ELEMS, kernel: str = "auto") -> torch.Tensor:
    kernel = resolve_kernel(kernel, x)
    if kernel != "rows":
        fn = _compiled_vectorised() if kernel == "compile" else local_attend_vectorised
        y = fn(x, a_cells, offsets, I, J)
        return y if size is None else _resize_bilinear_aa(y, size)
    mix = _NeighbourMix(x, a_cells, offsets)
    if size is None or tuple(size) == (x.shape[-2] * I, x.shape[-1] * J):
        return mix.full(I, J, chunk_elems)
    if size[1] == 1:  # not separable there (see _resize_bilinear_aa)
        return _resize_bilinear_aa(mix.full(I, J, chunk_elems), size)
    return mix.resized(I, J, tuple(size))


class LocalAttender(nn.Module):
    """Logits = Conv1x1(guide) + guide[:, :n]; softmax over the n neighbours; convex combination of the
    replication-padded low-res neighbours of each high-res pixel's parent cell."""

    def __init__(self, in_channels: int, num_connected: int = 17, conv_res: bool = True, low_mem: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        self.kernel = check_kernel(kernel)
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
            return _attend(x, a, self.offsets, H // h, W // w, size, kernel=self.kernel)
        return local_attend_reference(x, torch.softmax(z, dim=1), self.offsets)


def _resize_bilinear_aa(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """torchvision ``resize`` (bilinear, antialias on) for float tensors: the official route's final resize."""
    return resize(x, size, "bilinear", antialias=True)


class DirectHead(nn.Module):
    """The "no Local Attender" ablation (UPLiFT Table 7): each step's features are a 1x1 conv of the decoder's guide
    map (channels -> the features' channels) instead of a convex combination of the low-res neighbours.  The sources
    we have do not describe the ablation's head; this is the smallest one that gives features of the right shape."""

    def __init__(self, guide_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(guide_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, guide: torch.Tensor, fast: bool = False,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.proj(guide.to(self.proj.weight.dtype)).to(x.dtype)
