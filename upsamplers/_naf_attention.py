"""NAF's cross-scale neighbourhood attention, exact, in pure PyTorch (plus an optional NATTEN path).

NAF resizes the low-resolution keys (B, D, h, w) and values (B, C, h, w) to the query grid (Ho, Wo) with
``nearest-exact`` and runs NATTEN's dilated neighbourhood attention there (odd kernel k, dilation
d = (Ho // h, Wo // w), no relative position bias).  Per axis of length L, token i belongs to dilation group
g = i mod d at in-group position p = i div d; the group has L_g = ceil((L - g) / d) members and i attends to the k
consecutive members starting at s = clamp(p - k // 2, 0, L_g - k): centred, shifted inwards at the borders, never
padded.  The 2-D neighbourhood is the product of the row and column windows.

Here every neighbour is mapped back to the low-resolution cell the resize copied it from, so the resized tensors
are never built: queries whose neighbour lists are identical on an axis are grouped, and each group attends to its
k x k gathered keys with one batched matmul.  A repeated cell stays a separate neighbour, exactly as after the
resize.  Where NATTEN refuses (fewer than k members in a dilation group: feature grids under 9 cells, outputs
smaller than the features) the window is the whole group, every member once.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from upbench.errors import UpbenchError

from .base import query_chunk, use_device_path

#: CPU path: logits (and gathered queries) of one block of row groups stay under this many elements
_CPU_BLOCK_ELEMENTS = 1 << 25
#: per-group cost, in query slots, of gathering a group's keys and values (picks the group size on an axis)
_GROUP_OVERHEAD = 4


@functools.lru_cache(maxsize=64)
def nearest_exact_source(n_out: int, n_in: int) -> Tuple[int, ...]:
    """The input index each output index of ``F.interpolate(mode="nearest-exact")`` reads along one axis, taken
    from PyTorch itself (its CPU kernel), so the mapping is the one NAF's resize uses."""
    ramp = torch.arange(n_in, dtype=torch.float64).view(1, 1, n_in, 1)
    src = F.interpolate(ramp, size=(n_out, 1), mode="nearest-exact")
    return tuple(int(v) for v in src.view(-1).tolist())


def window(index: int, length: int, kernel: int, dilation: int) -> List[int]:
    """The tokens (indices on an axis of ``length``) that token ``index`` attends to: NATTEN's dilated window, or
    the whole dilation group where it has fewer than ``kernel`` members."""
    group, pos = index % dilation, index // dilation
    members = (length - group + dilation - 1) // dilation
    k = min(kernel, members)
    start = min(max(pos - kernel // 2, 0), members - k)
    return [group + (start + a) * dilation for a in range(k)]


def _group_size(sizes: List[int]) -> int:
    """Queries per batched-matmul group: the size with the fewest padded slots plus per-group overhead."""
    best, best_cost = 1, None
    for m in range(1, max(sizes) + 1):
        cost = sum(-(-n // m) * (m + _GROUP_OVERHEAD) for n in sizes)
        if best_cost is None or cost < best_cost:
            best, best_cost = m, cost
    return best


class AxisPlan(NamedTuple):
    """One axis of the attention, as index tensors: ``members`` (n, M) the queries of each group (padded with a
    repeat of a member), ``keys`` (n, k) the low-resolution cells each group attends to, ``valid`` (n, k) which of
    them are real neighbours (None: all), ``group`` and ``offset`` (L,) where each query sits among them;
    ``regular``: the groups are consecutive runs of queries, all full (then reshapes replace the gathers)."""

    members: torch.Tensor
    keys: torch.Tensor
    valid: Optional[torch.Tensor]
    group: torch.Tensor
    offset: torch.Tensor
    regular: bool


@functools.lru_cache(maxsize=64)
def axis_plan(length: int, source: int, kernel: int, dilation: int) -> AxisPlan:
    """The plan of one axis: ``length`` queries, keys on ``source`` cells resized to ``length`` (``nearest-exact``),
    ``kernel`` neighbours at ``dilation`` on the resized axis.  ``source == length`` is plain dilated attention."""
    src = nearest_exact_source(length, source) if source != length else tuple(range(length))
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i in range(length):
        groups.setdefault(tuple(src[t] for t in window(i, length, kernel, dilation)), []).append(i)
    m = _group_size([len(v) for v in groups.values()])
    k = max(len(key) for key in groups)
    members, keys, valid, group, offset = [], [], [], [0] * length, [0] * length
    for key, queries in groups.items():
        for start in range(0, len(queries), m):
            part = queries[start:start + m]
            for j, i in enumerate(part):
                group[i], offset[i] = len(members), j
            members.append(part + [part[0]] * (m - len(part)))
            keys.append(list(key) + [key[0]] * (k - len(key)))
            valid.append([True] * len(key) + [False] * (k - len(key)))
    valid_t = torch.tensor(valid)
    regular = [i for part in members for i in part] == list(range(length))
    return AxisPlan(torch.tensor(members), torch.tensor(keys), None if bool(valid_t.all()) else valid_t,
                    torch.tensor(group), torch.tensor(offset), regular)


_DEVICE_PLANS: Dict[Tuple[int, int, int, int, str], AxisPlan] = {}


def device_plan(length: int, source: int, kernel: int, dilation: int, device: torch.device) -> AxisPlan:
    """:func:`axis_plan` on ``device``, copied there once per shape (never inside a timed forward again)."""
    key = (length, source, kernel, dilation, str(device))
    plan = _DEVICE_PLANS.get(key)
    if plan is None:
        host = axis_plan(length, source, kernel, dilation)
        moved = {name: getattr(host, name).to(device) for name in ("members", "keys", "group", "offset")}
        plan = host._replace(valid=None if host.valid is None else host.valid.to(device), **moved)
        if len(_DEVICE_PLANS) > 256:
            _DEVICE_PLANS.clear()
        _DEVICE_PLANS[key] = plan
    return plan


def _heads_last(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads * D, h, w) -> (B, heads, h, w, D), contiguous: gathering cells from it copies whole D-vectors."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h, w).permute(0, 1, 3, 4, 2).contiguous()


def _windows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, H, h, w, D) at row indices ``rows`` (nr, a) and column indices ``cols`` (nc, c) ->
    (B, H, nr, nc, a * c, D): for every (row group, column group) pair its a x c cells, row-major."""
    out = x[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    return out.reshape(x.shape[0], x.shape[1], rows.shape[0], cols.shape[0], rows.shape[1] * cols.shape[1], -1)


def _group_queries(q: torch.Tensor, rows: AxisPlan, cols: AxisPlan) -> torch.Tensor:
    """(B, H, D, Ho, Wo) -> (B, H, nr, nc, D, Mr * Mc): the queries of every (row group, column group) pair."""
    b, heads, d = q.shape[:3]
    nr, mr, nc, mc = *rows.members.shape, *cols.members.shape
    x = q.reshape(b, heads, d, nr, mr, q.shape[-1]) if rows.regular else q[:, :, :, rows.members]
    x = x.reshape(b, heads, d, nr, mr, nc, mc) if cols.regular else x[..., cols.members]
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, heads, nr, nc, d, mr * mc)


def _ungroup(out: torch.Tensor, rows: AxisPlan, cols: AxisPlan) -> torch.Tensor:
    """(B, H, nr, nc, D, Mr * Mc) -> (B, H * D, Ho, Wo): every query's output from its slot (``rows`` may be a
    block of a regular plan)."""
    b, heads, nr, nc, d = out.shape[:5]
    mr, mc = rows.members.shape[1], cols.members.shape[1]
    out = out.reshape(b, heads, nr, nc, d, mr, mc).permute(0, 1, 4, 2, 5, 3, 6)   # (B, H, D, nr, Mr, nc, Mc)
    if rows.regular and cols.regular:
        return out.reshape(b, heads * d, nr * mr, nc * mc)
    if rows.regular:
        out = out[..., cols.group, cols.offset]
    elif cols.regular:
        out = out[:, :, :, rows.group, rows.offset]
    else:
        out = out[:, :, :, rows.group[:, None], rows.offset[:, None], cols.group[None, :], cols.offset[None, :]]
    return out.reshape(b, heads * d, nr * mr if rows.regular else rows.group.numel(),
                       nc * mc if cols.regular else cols.group.numel())


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: AxisPlan, cols: AxisPlan,
            scale: float) -> torch.Tensor:
    """Grouped queries (B, H, nr, nc, Dq, M) -> their outputs (B, H, nr, nc, Dv, M): logits are kept transposed
    (keys x queries), so neither matmul needs a copy of its operands."""
    logits = torch.matmul(_windows(k, rows.keys, cols.keys), q) * scale
    if rows.valid is not None or cols.valid is not None:
        vr = rows.valid if rows.valid is not None else rows.keys.new_ones(rows.keys.shape, dtype=torch.bool)
        vc = cols.valid if cols.valid is not None else cols.keys.new_ones(cols.keys.shape, dtype=torch.bool)
        allowed = (vr[:, None, :, None] & vc[None, :, None, :]).reshape(vr.shape[0], vc.shape[0], -1, 1)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.matmul(_windows(v, rows.keys, cols.keys).transpose(-1, -2), logits.softmax(dim=-2))


def _rows(plan: AxisPlan, start: int, stop: int) -> AxisPlan:
    return plan._replace(members=plan.members[start:stop], keys=plan.keys[start:stop],
                         valid=None if plan.valid is None else plan.valid[start:stop])


def dilation_for(out_size: Tuple[int, int], in_size: Tuple[int, int]) -> Tuple[int, int]:
    """NAF's dilation ``(Ho // h, Wo // w)``, at least 1 (an output smaller than the features)."""
    return tuple(max(1, o // i) for o, i in zip(out_size, in_size))  # type: ignore[return-value]


def cross_scale_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int,
                          kernel_size: int, scale: float, dilation: Optional[Tuple[int, int]] = None,
                          block_elements: Optional[int] = None) -> torch.Tensor:
    """Multi-head neighbourhood attention of the query map to keys and values resized (``nearest-exact``) to it.

    queries (B, Dq, Ho, Wo); keys (B, Dq, h, w); values (B, C, h, w) -> (B, C, Ho, Wo).  Head n reads channels
    [n Dq/heads, (n+1) Dq/heads) of queries and keys and [n C/heads, (n+1) C/heads) of values; logits are
    ``(q . k) * scale`` over a ``kernel_size`` x ``kernel_size`` window at ``dilation`` (default
    :func:`dilation_for`).  When keys are on the query grid (h, w) = (Ho, Wo) this is plain dilated neighbourhood
    attention.  The accelerator path runs in one piece (split only when free device memory is short); the CPU
    path in blocks of about ``block_elements`` logits."""
    b, dq, ho, wo = queries.shape
    h, w = keys.shape[-2:]
    c = values.shape[1]
    if kernel_size % 2 == 0:
        raise UpbenchError(f"naf: kernel_size must be odd, got {kernel_size}")
    if dq % num_heads or c % num_heads:
        raise UpbenchError(f"naf: query ({dq}) and value ({c}) channels must be divisible by the {num_heads} heads")
    dil = dilation if dilation is not None else dilation_for((ho, wo), (h, w))
    rows = device_plan(ho, h, kernel_size, dil[0], queries.device)
    cols = device_plan(wo, w, kernel_size, dil[1], queries.device)
    qg = _group_queries(queries.reshape(b, num_heads, dq // num_heads, ho, wo), rows, cols)
    k, v = _heads_last(keys, num_heads), _heads_last(values, num_heads)
    nr, mr, nc, mc = *rows.members.shape, *cols.members.shape
    kk = rows.keys.shape[1] * cols.keys.shape[1]
    per_group = b * num_heads * mr * nc * mc * (2 * kk + 2 * c // num_heads)   # elements per row group
    if use_device_path(queries):
        step = query_chunk(nr, per_group * queries.element_size(), queries.device)
    else:
        step = max(1, (block_elements or _CPU_BLOCK_ELEMENTS) // max(1, per_group))
    if step >= nr:
        return _ungroup(_attend(qg, k, v, rows, cols, scale), rows, cols)
    if rows.regular:   # each block of row groups is a band of output rows: write it in place
        out = queries.new_empty(b, c, ho, wo)
        for s in range(0, nr, step):
            block = _rows(rows, s, s + step)
            out[:, :, s * mr:(s + step) * mr] = _ungroup(_attend(qg[:, :, s:s + step], k, v, block, cols, scale),
                                                         block, cols)
        return out
    grouped = torch.cat([_attend(qg[:, :, s:s + step], k, v, _rows(rows, s, s + step), cols, scale)
                         for s in range(0, nr, step)], dim=2)
    return _ungroup(grouped, rows, cols)


# --------------------------------------------------------------------------------------------------------- NATTEN
def natten_available() -> bool:
    """Whether the ``natten`` package imports (it is optional; nothing here needs it)."""
    try:
        import natten  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken build raises more than ImportError)
        return False
    return True


def natten_fits(out_size: Tuple[int, int], dilation: Tuple[int, int], kernel_size: int) -> bool:
    """NATTEN's own limit: kernel x dilation <= length on both axes."""
    return all(d >= 1 and kernel_size * d <= n for n, d in zip(out_size, dilation))


def natten_cross_scale_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int,
                                 kernel_size: int, scale: float) -> torch.Tensor:
    """The same operation through NATTEN, as NAF calls it: keys and values resized with ``nearest-exact``, then
    ``na2d_qk`` / softmax / ``na2d_av`` (NATTEN <= 0.17) or ``natten.na2d`` (NATTEN >= 0.20)."""
    b, dq, ho, wo = queries.shape
    c = values.shape[1]
    dil = dilation_for((ho, wo), tuple(keys.shape[-2:]))
    if not natten_fits((ho, wo), dil, kernel_size):
        raise UpbenchError(f"naf: NATTEN needs {kernel_size} x dilation <= output size on both axes (output "
                           f"{ho}x{wo}, dilation {dil}); use attention='torch' for this size")
    keys = F.interpolate(keys, size=(ho, wo), mode="nearest-exact")
    values = F.interpolate(values, size=(ho, wo), mode="nearest-exact")

    def heads_first(x: torch.Tensor) -> torch.Tensor:   # (B, heads, Ho, Wo, D)
        return x.reshape(b, num_heads, x.shape[1] // num_heads, ho, wo).permute(0, 1, 3, 4, 2).contiguous()

    try:
        from natten.functional import na2d_av, na2d_qk
    except ImportError:
        na2d_qk = None
    if na2d_qk is not None:
        attn = na2d_qk(heads_first(queries), heads_first(keys), kernel_size=kernel_size, dilation=dil) * scale
        out = na2d_av(attn.softmax(dim=-1), heads_first(values), kernel_size=kernel_size, dilation=dil)
    else:
        import natten

        def heads_last(x: torch.Tensor) -> torch.Tensor:   # (B, Ho, Wo, heads, D)
            return heads_first(x).permute(0, 2, 3, 1, 4).contiguous()

        out = natten.na2d(heads_last(queries), heads_last(keys), heads_last(values), kernel_size=kernel_size,
                          dilation=dil, scale=scale).permute(0, 3, 1, 2, 4)
    return out.permute(0, 1, 4, 2, 3).reshape(b, c, ho, wo)
