"""Scaling-sweep tables and the Figure-1-style plot (``upbench sweep scaling`` rows): forward time and peak memory
versus tokens per upsampler, log-log slopes, the largest token count reached under the memory cap."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .tables import UPSAMPLER_ORDER, Table
from .tables import order as _order

SCALING_FAIL_LABELS = {"oom": "OOM", "timeout": "timeout", "error": "error"}
#: a timed point whose IQR exceeds this fraction of its median is flagged as noisy
NOISY_IQR = 0.25
#: a point timed while the 1-minute load average exceeded this many times the CPUs it may use is flagged as loaded
LOADED = 1.25
#: the fewest points a log-log slope is fitted on
MIN_SLOPE_POINTS = 3
FLAGS = {"noisy": "†", "loaded": "‡"}


def point_flags(row: Dict[str, Any]) -> List[str]:
    """Why a point's time is not trustworthy: ``noisy`` (IQR / median > NOISY_IQR), ``loaded`` (the machine's load
    during the timed runs above LOADED x its CPUs)."""
    t = row.get("timing") or {}
    flags = []
    median, iqr = t.get("median_ms"), t.get("iqr_ms")
    if row.get("status") == "ok" and median and iqr is not None and iqr / median > NOISY_IQR:
        flags.append("noisy")
    loads = [v for v in (t.get("load_start"), t.get("load_end")) if isinstance(v, (int, float))]
    if loads and t.get("cpu_count") and max(loads) > LOADED * t["cpu_count"]:
        flags.append("loaded")
    return flags


def _marks(row: Dict[str, Any]) -> str:
    return "".join(FLAGS[f] for f in point_flags(row))


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x); None with fewer than two distinct points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


#: per sweep axis: what varies (titles), the table's row header, the unit of a point's x
AXES = {"tokens": ("tokens", "Tokens (px)"), "ratio": ("upsampling ratio", "Ratio (output px)"),
        "channels": ("channels", "Channels")}
PASS_LABELS = {"forward": "forward", "backward": "forward + backward"}


def axis_of(row: Dict[str, Any]) -> Tuple[str, str]:
    """(axis, pass) of a sweep point; rows written before the other curves existed are tokens / forward."""
    d = row.get("data") or {}
    return d.get("axis", "tokens"), d.get("pass", "forward")


def x_of(row: Dict[str, Any]) -> float:
    """The value that varies along the point's curve (tokens, upsampling ratio or channels)."""
    d = row["data"]
    return d["x"] if d.get("x") is not None else d["tokens"]


def x_label(row: Dict[str, Any]) -> str:
    axis, _ = axis_of(row)
    d = row["data"]
    if axis == "ratio":
        return f"{x_of(row)}x ({d.get('output', d['size'])} px)"
    if axis == "channels":
        return f"{x_of(row)}"
    return f"{d['tokens']} ({d['size']} px)"


def _curve_label(row: Dict[str, Any]) -> str:
    axis, pass_ = axis_of(row)
    d = row["data"]
    if axis == "ratio":
        what = f"vs upsampling ratio ({d['size']} px image, {d['grid']}x{d['grid']} features)"
    elif axis == "channels":
        what = f"vs channels ({d['size']} px)"
    else:
        what = "vs tokens"
    return f"{PASS_LABELS[pass_]} {what}"


def _scaling_groups(rows: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, ...], List[Dict[str, Any]]]:
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") != "scaling":
            continue
        c = r.get("config", {})
        dev = c.get("device", {})
        key = (r["backbone"], _curve_label(r), f"tag {c['tag']}" if c.get("tag") else "",
               f"{dev.get('type', '?')} ({dev.get('name', '?')})", str(c.get("dtype", "?")),
               f"{c.get('cpu_threads', '?')} threads" if dev.get("type") == "cpu" else "",
               f"cap {c.get('memory_limit_gb', '?'):g} GB" if isinstance(c.get("memory_limit_gb"), (int, float)) else "")
        groups[key].append(r)
    return groups


def scaling_summary(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per upsampler: slopes of time and memory versus the curve's x (tokens, ratio or channels; ``max_tokens`` is
    the largest x reached), what stopped it.

    The time slope is fitted on the fully timed points that are not flagged (:func:`point_flags`); with fewer than
    MIN_SLOPE_POINTS of those it falls back to every point with a time (flagged, or timed once at the time limit),
    marked ``fallback``; with fewer still there is no slope.  The top-3 slope only exists with more than three
    trusted points (otherwise it would repeat the slope)."""
    by_up: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_up[r["upsampler"]].append(r)
    out: Dict[str, Dict[str, Any]] = {}
    for up in _order(by_up, UPSAMPLER_ORDER):
        rs = sorted(by_up[up], key=x_of)
        timed = [r for r in rs if r["status"] == "ok" and r["timing"].get("median_ms") and not point_flags(r)]
        mem = [r for r in rs if r["status"] in ("ok", "time_limit") and r["memory"].get("peak_mb")]
        reached = [r for r in rs if r["status"] in ("ok", "time_limit")]
        failed = [r for r in rs if r["status"] in SCALING_FAIL_LABELS]
        fallback = False
        if len(timed) < MIN_SLOPE_POINTS:
            timed = [r for r in rs if r["status"] in ("ok", "time_limit") and r["timing"].get("median_ms")]
            fallback = True
        top = timed[-3:] if not fallback and len(timed) > 3 else []

        def slope(points: List[Dict[str, Any]], value) -> Optional[float]:
            if len(points) < MIN_SLOPE_POINTS:
                return None
            return fit_slope([x_of(r) for r in points], [value(r) for r in points])

        time_slope = slope(timed, lambda r: r["timing"]["median_ms"])
        out[up] = {
            "family": rs[0]["data"].get("family", "learned"),
            "params_m": (rs[0].get("params", {}).get("upsampler") or 0) / 1e6,
            "time_slope": time_slope,
            "time_slope_single": fallback and time_slope is not None,
            "time_slope_top": slope(top, lambda r: r["timing"]["median_ms"]),
            "memory_slope": slope(mem, lambda r: r["memory"]["peak_mb"]),
            "flagged": sum(1 for r in rs if point_flags(r)),
            "max_tokens": x_of(reached[-1]) if reached else None,
            "max_size": reached[-1]["data"]["size"] if reached else None,
            "max_label": x_label(reached[-1]) if reached else None,
            "stopped": (f"{SCALING_FAIL_LABELS[failed[0]['status']]} at {x_of(failed[0])}" if failed else
                        "time limit" if rs[-1]["status"] == "time_limit" else "–"),
            "gflops": {x_of(r): r["data"].get("gflops") for r in rs},
        }
    return out


def _title(key: Tuple[str, ...]) -> str:
    return " - ".join(k for k in key if k)


def scaling_tables(rows: Sequence[Dict[str, Any]]) -> List[Table]:
    """Per (backbone, curve, device, dtype, threads, cap): time and peak memory (rows = the curve's x: tokens,
    upsampling ratio or channels; columns = upsamplers), then a summary per upsampler with the log-log slopes and the
    largest x reached."""
    tables = []
    for key, grp in sorted(_scaling_groups(rows).items()):
        title = _title(key)
        axis, pass_ = axis_of(grp[0])
        what_x, row_header = AXES[axis]
        ups = _order((r["upsampler"] for r in grp), UPSAMPLER_ORDER)
        cell = {(r["upsampler"], x_of(r)): r for r in grp}
        xs = sorted({x_of(r) for r in grp})
        label_of = {x_of(r): x_label(r) for r in grp}
        runs = sorted({r["timing"].get("runs", 0) for r in grp if r["status"] == "ok"})
        flagged = {f for r in grp for f in point_flags(r)}
        timed_what = "forward + backward steps" if pass_ == "backward" else "forwards"
        for what in ("time", "memory"):
            cols = [("", u) for u in ups]
            unit = "median ms (IQR)" if what == "time" else "peak MB"
            t = Table(f"Scaling {what} ({unit}) - {title}", cols, row_header=row_header)
            for n in xs:
                cells: Dict[Tuple[str, str], Any] = {}
                for u in ups:
                    r = cell.get((u, n))
                    if r is None:
                        cells[("", u)] = "–"
                    elif r["status"] in SCALING_FAIL_LABELS:
                        cells[("", u)] = SCALING_FAIL_LABELS[r["status"]]
                    elif what == "time":
                        tm = r["timing"]
                        cells[("", u)] = (f"{tm['median_ms']:.1f}*" if r["status"] == "time_limit" else
                                          f"{tm['median_ms']:.1f} ({tm['iqr_ms']:.1f}){_marks(r)}")
                    else:
                        mb = r["memory"].get("peak_mb")
                        cells[("", u)] = "–" if mb is None else f"{mb:.0f}"
                t.rows.append((label_of[n], cells))
            if what == "time":
                t.notes.append(f"median (IQR) of {'/'.join(map(str, runs)) or '?'} timed {timed_what} after warm-up; "
                               "* = one only (the point's time limit); OOM = over the memory cap; "
                               "– = not run (a smaller point already failed)")
                if pass_ == "backward":
                    t.notes.append("forward + backward of the output's sum in train mode, gradients for the "
                                   "upsampler's weights and the input features (one training step's cost)")
                if "noisy" in flagged:
                    t.notes.append(f"† noisy: IQR above {NOISY_IQR:.0%} of the median; not used for slopes")
                if "loaded" in flagged:
                    t.notes.append(f"‡ loaded: the machine's load average exceeded {LOADED:g} x its CPUs while timing; "
                                   "not used for slopes; re-run on a quiet machine")
            tables.append(t)
        summ = scaling_summary(grp)
        ref = _reference_x(axis, xs, grp)
        top_col = any(s["time_slope_top"] is not None for s in summ.values())
        flops_col = f"GFLOPs @{label_of[ref]}"
        cols = [("", "Family"), ("", "Params (M)"), ("", flops_col), ("", "Time slope")]
        cols += [("", "Time slope (top 3)")] if top_col else []
        cols += [("", "Memory slope"), ("", f"Max {what_x}"), ("", "Stopped by")]
        t = Table(f"Scaling summary (log-log slopes vs {what_x}) - {title}", cols)
        for u in ups:
            s = summ[u]
            g = s["gflops"].get(ref)
            cells = {
                ("", "Family"): s["family"], ("", "Params (M)"): f"{s['params_m']:.2f}" if s["params_m"] else "–",
                ("", flops_col): "–" if g is None else f"{g:.1f}",
                ("", "Time slope"): _num(s["time_slope"]) + ("*" if s["time_slope_single"] else ""),
                ("", "Memory slope"): _num(s["memory_slope"]),
                ("", f"Max {what_x}"): "–" if s["max_tokens"] is None else s["max_label"],
                ("", "Stopped by"): s["stopped"]}
            if top_col:
                cells[("", "Time slope (top 3)")] = _num(s["time_slope_top"])
            t.rows.append((u, cells))
        t.notes.append(f"slopes: least-squares fit of log(time) / log(peak memory) on log({what_x}), over at least "
                       f"{MIN_SLOPE_POINTS} points: the fully timed points not flagged † / ‡ (time) or the measured "
                       "points (memory); * = too few of those, so flagged and single-forward points are fitted too; "
                       "– = fewer points than that. 1 = linear, 2 = quadratic. GFLOPs count matmul/conv ops "
                       "(torch.utils.flop_counter).")
        negative = [u for u in ups if (summ[u]["time_slope"] or 0) < 0]
        if negative:
            t.notes.append("negative time slopes (" + ", ".join(negative) + "): at these sizes fixed per-call costs "
                           "dominate; the slope says nothing about scaling")
        if axis == "tokens":
            t.notes += _reach_notes(summ)
        tables.append(t)
    return tables


def _reference_x(axis: str, xs: Sequence[float], grp: Sequence[Dict[str, Any]]) -> float:
    """The point whose FLOPs the summary prints: the image side nearest 448 px (tokens), ratio 16 (NAF's default
    28x28 -> 448) or 384 channels (DINOv2-S), else the nearest to those."""
    if axis == "tokens":
        size_of = {x_of(r): r["data"]["size"] for r in grp}
        return min(xs, key=lambda n: abs(size_of[n] - 448))
    target = 16 if axis == "ratio" else 384
    return min(xs, key=lambda n: (abs(math.log(n / target)), n))


def scaling_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """Tidy CSV of every sweep point: one value per cell, units in the column names."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = ["backbone", "device", "dtype", "threads", "memory_cap_gb", "tag", "upsampler", "family", "axis", "pass",
            "tokens", "size_px", "output_px", "ratio", "channels", "status", "median_ms", "iqr_ms", "min_ms", "runs",
            "peak_mb", "gflops", "params", "load_start", "load_end", "cpu_count", "flags"]
    writer.writerow(cols)
    for key, grp in sorted(_scaling_groups(rows).items()):
        for r in sorted(grp, key=lambda r: (r["upsampler"], x_of(r))):
            c, t, m, d = r.get("config", {}), r.get("timing") or {}, r.get("memory") or {}, r["data"]
            writer.writerow([r["backbone"], (c.get("device") or {}).get("name"), c.get("dtype"), c.get("cpu_threads"),
                             c.get("memory_limit_gb"), c.get("tag") or "", r["upsampler"], d.get("family"),
                             *axis_of(r), d["tokens"], d["size"], d.get("output", d["size"]),
                             d.get("ratio", d.get("output", d["size"]) / max(1, d.get("grid") or 1)),
                             d.get("channels", (c.get("backbone") or {}).get("channels")),
                             r["status"], t.get("median_ms"), t.get("iqr_ms"),
                             t.get("min_ms"), t.get("runs"), m.get("peak_mb"), d.get("gflops"),
                             (r.get("params") or {}).get("upsampler"), t.get("load_start"), t.get("load_end"),
                             t.get("cpu_count"), " ".join(point_flags(r))])
    return buf.getvalue()


def _num(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def _reach_notes(summ: Dict[str, Dict[str, Any]]) -> List[str]:
    """How far each local method reaches compared with the best cross-attention method under the same cap; only
    meaningful when that method actually failed inside the grid."""
    cross = {u: s for u, s in summ.items() if s["family"] == "cross-attention" and s["max_tokens"]}
    if not cross:
        return []
    best = max(sorted(cross), key=lambda u: cross[u]["max_tokens"])
    if cross[best]["stopped"] in ("–", "time limit"):
        return [f"reach: no cross-attention method failed within this grid (best: {best} at "
                f"{cross[best]['max_tokens']} tokens); extend sizes or lower memory_limit_gb to compare reach."]
    notes = []
    for u, s in summ.items():
        if s["family"] == "local" and s["max_tokens"]:
            bound = "at least " if s["stopped"] in ("–", "time limit") else ""
            notes.append(f"reach: {u} {bound}{s['max_tokens'] / cross[best]['max_tokens']:.2f}x the tokens of the "
                         f"best cross-attention method ({best}: {cross[best]['max_tokens']}, {cross[best]['stopped']}).")
    return notes
