"""Scaling-sweep tables and the Figure-1-style plot (``upbench sweep scaling`` rows): forward time and peak memory
versus tokens per upsampler, log-log slopes, the largest token count reached under the memory cap."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .tables import UPSAMPLER_ORDER, Table
from .tables import order as _order

SCALING_FAIL_LABELS = {"oom": "OOM", "timeout": "timeout", "error": "error"}


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x); None with fewer than two distinct points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _scaling_groups(rows: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, ...], List[Dict[str, Any]]]:
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") != "scaling":
            continue
        c = r.get("config", {})
        dev = c.get("device", {})
        key = (r["backbone"], f"tag {c['tag']}" if c.get("tag") else "",
               f"{dev.get('type', '?')} ({dev.get('name', '?')})", str(c.get("dtype", "?")),
               f"{c.get('cpu_threads', '?')} threads" if dev.get("type") == "cpu" else "",
               f"cap {c.get('memory_limit_gb', '?'):g} GB" if isinstance(c.get("memory_limit_gb"), (int, float)) else "")
        groups[key].append(r)
    return groups


def scaling_summary(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per upsampler: slopes of time and memory versus tokens, the largest tokens reached, what stopped it."""
    by_up: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_up[r["upsampler"]].append(r)
    out: Dict[str, Dict[str, Any]] = {}
    for up in _order(by_up, UPSAMPLER_ORDER):
        rs = sorted(by_up[up], key=lambda r: r["data"]["tokens"])
        timed = [r for r in rs if r["status"] == "ok" and r["timing"].get("median_ms")]
        mem = [r for r in rs if r["status"] in ("ok", "time_limit") and r["memory"].get("peak_mb")]
        reached = [r for r in rs if r["status"] in ("ok", "time_limit")]
        failed = [r for r in rs if r["status"] in SCALING_FAIL_LABELS]
        timed_star = False
        if len(timed) < 2:  # too few fully timed points: fit the single-forward (time-limited) ones too, marked *
            timed = [r for r in rs if r["status"] in ("ok", "time_limit") and r["timing"].get("median_ms")]
            timed_star = True
        top = timed[-3:] if not timed_star else []
        out[up] = {
            "family": rs[0]["data"].get("family", "learned"),
            "params_m": (rs[0].get("params", {}).get("upsampler") or 0) / 1e6,
            "time_slope": fit_slope([r["data"]["tokens"] for r in timed], [r["timing"]["median_ms"] for r in timed]),
            "time_slope_single": timed_star,
            "time_slope_top": fit_slope([r["data"]["tokens"] for r in top], [r["timing"]["median_ms"] for r in top])
            if len(top) == 3 else None,
            "memory_slope": fit_slope([r["data"]["tokens"] for r in mem], [r["memory"]["peak_mb"] for r in mem]),
            "max_tokens": reached[-1]["data"]["tokens"] if reached else None,
            "max_size": reached[-1]["data"]["size"] if reached else None,
            "stopped": (f"{SCALING_FAIL_LABELS[failed[0]['status']]} at {failed[0]['data']['tokens']}" if failed else
                        "time limit" if rs[-1]["status"] == "time_limit" else "–"),
            "gflops": {r["data"]["tokens"]: r["data"].get("gflops") for r in rs},
        }
    return out


def scaling_tables(rows: Sequence[Dict[str, Any]]) -> List[Table]:
    """Per (backbone, device, dtype, threads, cap): forward time and peak memory (rows = tokens, columns =
    upsamplers), then a summary per upsampler with the log-log slopes and the largest token count reached."""
    tables = []
    for key, grp in sorted(_scaling_groups(rows).items()):
        title = " - ".join(k for k in key if k)
        ups = _order((r["upsampler"] for r in grp), UPSAMPLER_ORDER)
        cell = {(r["upsampler"], r["data"]["tokens"]): r for r in grp}
        tokens = sorted({r["data"]["tokens"] for r in grp})
        size_of = {r["data"]["tokens"]: r["data"]["size"] for r in grp}
        runs = sorted({r["timing"].get("runs", 0) for r in grp if r["status"] == "ok"})
        for what in ("time", "memory"):
            cols = [("", u) for u in ups]
            unit = "median ms (IQR)" if what == "time" else "peak MB"
            t = Table(f"Scaling {what} ({unit}) - {title}", cols)
            for n in tokens:
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
                                          f"{tm['median_ms']:.1f} ({tm['iqr_ms']:.1f})")
                    else:
                        mb = r["memory"].get("peak_mb")
                        cells[("", u)] = "–" if mb is None else f"{mb:.0f}"
                t.rows.append((f"{n} tok ({size_of[n]} px)", cells))
            if what == "time":
                t.notes.append(f"median (IQR) of {'/'.join(map(str, runs)) or '?'} timed forwards after warm-up; "
                               "* = one forward only (the point's time limit); OOM = over the memory cap; "
                               "– = not run (a smaller size already failed)")
            tables.append(t)
        summ = scaling_summary(grp)
        ref_tokens = min(tokens, key=lambda n: abs(size_of[n] - 448))
        cols = [("", "Family"), ("", "Params (M)"), ("", f"GFLOPs @{size_of[ref_tokens]}px"),
                ("", "Time slope"), ("", "Time slope (top 3)"), ("", "Memory slope"), ("", "Max tokens"),
                ("", "Stopped by")]
        t = Table(f"Scaling summary (log-log slopes vs tokens) - {title}", cols)
        for u in ups:
            s = summ[u]
            g = s["gflops"].get(ref_tokens)
            t.rows.append((u, {
                ("", "Family"): s["family"], ("", "Params (M)"): f"{s['params_m']:.2f}" if s["params_m"] else "–",
                ("", f"GFLOPs @{size_of[ref_tokens]}px"): "–" if g is None else f"{g:.1f}",
                ("", "Time slope"): _num(s["time_slope"]) + ("*" if s["time_slope_single"] and s["time_slope"] else ""),
                ("", "Time slope (top 3)"): _num(s["time_slope_top"]),
                ("", "Memory slope"): _num(s["memory_slope"]),
                ("", "Max tokens"): "–" if s["max_tokens"] is None else f"{s['max_tokens']} ({s['max_size']} px)",
                ("", "Stopped by"): s["stopped"]}))
        t.notes.append("slopes: least-squares fit of log(time) / log(peak memory) on log(tokens) over the timed "
                       "(time) or measured (memory) points (* = fewer than two fully timed points, so the single "
                       "forwards are fitted too); 1 = linear, 2 = quadratic. GFLOPs count matmul/conv ops "
                       "(torch.utils.flop_counter).")
        t.notes += _reach_notes(summ)
        tables.append(t)
    return tables


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


def scaling_figure(rows: Sequence[Dict[str, Any]], path: str, log_scale: bool = True) -> Optional[str]:
    """Figure-1-style PNG: forward time and peak memory versus tokens, one line per upsampler, an x where an
    upsampler ran out of memory. Returns the path, or None when there is nothing to plot."""
    pts = [r for r in rows if r.get("task") == "scaling"]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    recs = []
    for r in pts:
        recs.append({"upsampler": r["upsampler"], "tokens": r["data"]["tokens"], "status": r["status"],
                     "time_ms": r["timing"].get("median_ms") if r["status"] in ("ok", "time_limit") else None,
                     "memory_mb": r["memory"].get("peak_mb") if r["status"] in ("ok", "time_limit") else None})
    df = pd.DataFrame(recs)
    order = _order(df["upsampler"], UPSAMPLER_ORDER)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = dict(zip(order, sns.color_palette("tab10", len(order))))
    for ax, col, label in ((axes[0], "time_ms", "forward time (ms)"), (axes[1], "memory_mb", "peak memory (MB)")):
        sub = df.dropna(subset=[col])
        if not sub.empty:
            sns.lineplot(data=sub, x="tokens", y=col, hue="upsampler", hue_order=[u for u in order if u in set(sub["upsampler"])],
                         palette=palette, marker="o", ax=ax)
        oom = df[df["status"] == "oom"]
        for _, o in oom.iterrows():
            done = df[(df["upsampler"] == o["upsampler"]) & df[col].notna()]
            if not done.empty:
                ax.scatter([o["tokens"]], [done[col].max()], marker="x", s=60, color=palette[o["upsampler"]], zorder=5)
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        if log_scale:
            ax.set_xscale("log")
            ax.set_yscale("log")
    axes[0].set_title("median of the timed runs (one forward past the time limit)", fontsize=8)
    axes[1].set_title("x = out of memory at that token count", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return str(path)
