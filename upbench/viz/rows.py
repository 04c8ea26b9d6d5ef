"""Figures drawn from result rows and logs alone: the scaling plot (UPLiFT Fig. 1), per-class IoU bars and
training-loss curves."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from .. import plotting
from ..report.scaling import PASS_LABELS, _scaling_groups, _title, axis_of, point_flags, x_label, x_of
from ..report.tables import DATASET_LABELS, UPSAMPLER_ORDER, order, protocol_of

FAMILY_STYLE = {"interpolation": ":", "local": "-", "cross-attention": "--", "classical": "-."}


def _quartiles(times: Sequence[float]):
    import numpy as np

    return tuple(float(v) for v in np.percentile(np.asarray(times, dtype=float), [25, 75]))


def scaling(rows: Sequence[Mapping[str, Any]], out_dir: Path, log_scale: bool = True) -> List[str]:
    """Per sweep curve (backbone, axis and pass, device, dtype, threads, cap): time and peak memory versus tokens (or
    upsampling ratio, or channels), log-log; an IQR band around each time line from the stored per-run times; line
    style by family (dotted interpolation, solid local, dashed cross-attention); the memory cap as a horizontal line;
    an ✕ on the cap at the point where a method ran out of memory; ticks labelled with the image or output side; one
    legend beside the plots."""
    plt = plotting.pyplot()
    import seaborn as sns

    paths: List[str] = []
    for key, grp in sorted(_scaling_groups(rows).items()):
        ups = order((r["upsampler"] for r in grp), UPSAMPLER_ORDER)
        palette = dict(zip(ups, sns.color_palette("tab10", max(10, len(ups)))))
        sns.set_theme(style="whitegrid", context="paper")
        fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
        axis, pass_ = axis_of(grp[0])
        tokens = sorted({x_of(r) for r in grp})
        label_of = {x_of(r): x_label(r).replace(" (", "\n(") for r in grp}
        cap_mb = None
        for u in ups:
            pts = sorted((r for r in grp if r["upsampler"] == u), key=x_of)
            family = pts[0]["data"].get("family", "local")
            style = dict(color=palette[u], linestyle=FAMILY_STYLE.get(family, "-"), marker="o", markersize=3.5,
                         linewidth=1.4)
            timed = [r for r in pts if r["status"] in ("ok", "time_limit") and r["timing"].get("median_ms")]
            if timed:
                x = [x_of(r) for r in timed]
                axes[0].plot(x, [r["timing"]["median_ms"] for r in timed], label=f"{u} ({family})", **style)
                band = [(x_of(r), *_quartiles(r["timing"]["times_ms"])) for r in timed
                        if len(r["timing"].get("times_ms") or []) >= 2]
                if band:
                    axes[0].fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                         color=palette[u], alpha=0.18, linewidth=0)
                flagged = [r for r in timed if point_flags(r)]
                axes[0].scatter([x_of(r) for r in flagged], [r["timing"]["median_ms"] for r in flagged],
                                s=60, facecolors="none", edgecolors=palette[u], linewidths=1.0, zorder=6)
            mem = [r for r in pts if r["status"] in ("ok", "time_limit") and r["memory"].get("peak_mb")]
            if mem:
                axes[1].plot([x_of(r) for r in mem], [r["memory"]["peak_mb"] for r in mem], **style)
            for r in pts:
                limit = (r.get("memory") or {}).get("limit_gb")
                if limit:
                    cap_mb = float(limit) * 1024
            for r in (r for r in pts if r["status"] == "oom"):
                y = cap_mb or max((m["memory"]["peak_mb"] for m in mem), default=1.0)
                axes[1].scatter([x_of(r)], [y], marker="x", s=70, color=palette[u], zorder=7,
                                linewidths=2)
        if cap_mb:
            axes[1].axhline(cap_mb, color="0.3", linewidth=1.0, linestyle=(0, (4, 2)))
            axes[1].annotate(f"memory cap {cap_mb / 1024:g} GB", (tokens[0], cap_mb), textcoords="offset points",
                             xytext=(2, 4), fontsize=8, color="0.3")
        x_name = {"tokens": "tokens (image side)", "ratio": "upsampling ratio (output side)",
                  "channels": "channels"}[axis]
        for ax, label in ((axes[0], f"{PASS_LABELS[pass_]} time (ms)"), (axes[1], "peak memory (MB)")):
            ax.set_ylabel(label)
            if log_scale:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xticks(tokens)
            ax.set_xticklabels([label_of[n] for n in tokens], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel(x_name)
        axes[0].set_title("median of the timed runs, band = IQR; ○ = flagged noisy / loaded", fontsize=8)
        axes[1].set_title("✕ = out of memory at that size (drawn on the cap)", fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        fig.suptitle("Scaling - " + _title(key), fontsize=10)
        fig.tight_layout()
        curve = [v for v in (axis if axis != "tokens" else "", pass_ if pass_ != "forward" else "") if v]
        slug = "_".join([str(key[0]), *curve] + [str(k).split(" ")[0] for k in key[2:] if k])
        paths += plotting.save(fig, Path(out_dir) / f"scaling_{_slug(slug)}")
    return paths


def per_class(rows: Sequence[Mapping[str, Any]], out_dir: Path, max_classes: int = 30) -> List[str]:
    """Per-class IoU bars of every segmentation table (same dataset and protocol) with two or more methods; with
    more than ``max_classes`` classes, the ones with the most validation pixels."""
    plt = plotting.pyplot()
    import numpy as np
    import seaborn as sns

    groups: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") == "seg" and r.get("status") == "ok" and (r.get("metrics") or {}).get("per_class_iou"):
            proto = protocol_of({"config": r.get("config"), "device": (r.get("device") or {}).get("type")})
            groups[json.dumps([r["dataset"], r["backbone"], proto], sort_keys=True, default=str)].append(r)
    paths: List[str] = []
    for gkey, grp in sorted(groups.items()):
        by_method: Dict[str, List[Mapping[str, Any]]] = defaultdict(list)
        for r in grp:
            by_method[r["upsampler"]].append(r)
        if len(by_method) < 2:
            continue
        names = list(grp[0]["data"].get("class_names") or [])
        support = np.asarray(grp[0]["data"].get("val_pixels_per_class") or [1] * len(names), dtype=float)
        keep = [k for k in np.argsort(-support)[:max_classes] if support[k] > 0]
        methods = order(by_method, UPSAMPLER_ORDER)
        values = np.full((len(methods), len(keep)), np.nan)
        for i, m in enumerate(methods):
            ious = np.asarray([[np.nan if v is None else v for v in r["metrics"]["per_class_iou"]]
                               for r in by_method[m]], dtype=float)
            values[i] = np.nanmean(ious, axis=0)[keep] if ious.size else np.nan
        sns.set_theme(style="whitegrid", context="paper")
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(keep) * max(1, len(methods) / 3) + 2), 3.8))
        width = 0.8 / len(methods)
        colors = sns.color_palette("tab10", max(10, len(methods)))
        for i, m in enumerate(methods):
            ax.bar(np.arange(len(keep)) + (i - (len(methods) - 1) / 2) * width, values[i], width, label=m,
                   color=colors[i])
        ax.set_xticks(np.arange(len(keep)))
        ax.set_xticklabels([names[k] if k < len(names) else str(k) for k in keep], rotation=45, ha="right",
                           fontsize=8)
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ds = grp[0]["dataset"]
        ax.set_title(f"Per-class IoU - {DATASET_LABELS.get(ds, ds)}, backbone {grp[0]['backbone']}", fontsize=10)
        ax.legend(fontsize=8, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.28),
                  frameon=False)
        fig.tight_layout()
        paths += plotting.save(fig, Path(out_dir) / f"per_class_{_slug(ds)}_{_slug(grp[0]['backbone'])}")
    return paths


def train_logs(results: Path) -> List[Path]:
    """Training logs (``<weights>.log.json``) under ``<results>/train``."""
    folder = Path(results) / "train"
    return sorted(folder.rglob("*.log.json")) if folder.is_dir() else []


def training(logs: Sequence[Path], out_dir: Path) -> List[str]:
    """Loss per optimiser step of every ``upbench train`` log: the total and each depth's term, log scale."""
    plt = plotting.pyplot()
    import seaborn as sns

    paths: List[str] = []
    for log in logs:
        try:
            data = json.loads(Path(log).read_text())
            history = data["history"]
        except (OSError, KeyError, json.JSONDecodeError, TypeError):
            continue
        if not history:
            continue
        sns.set_theme(style="whitegrid", context="paper")
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        steps = [h["step"] for h in history]
        window = max(1, len(history) // 25)
        series = [("total", "loss", "k")] + [(f"depth {k[1:]}", k, None) for k in sorted(
            k for k in history[0] if k.startswith("d") and k[1:].isdigit())]
        for i, (label, key, color) in enumerate(series):
            values = [h.get(key) for h in history]
            color = color or sns.color_palette("tab10")[i]
            ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.25)
            ax.plot(steps, _running_mean(values, window), color=color, linewidth=1.6,
                    label=f"{label} (mean of {window} steps)" if window > 1 else label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("multi-depth loss")
        cfg = data.get("config") or {}
        ax.set_title(f"upbench train - {(cfg.get('upsampler') or {}).get('name', '?')} on "
                     f"{(cfg.get('backbone') or {}).get('name', '?')} ({len(history)} steps)", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        fig.tight_layout()
        paths += plotting.save(fig, Path(out_dir) / f"train_{_slug(Path(log).name.replace('.log.json', ''))}")
    return paths


def _running_mean(values: Sequence[float], window: int) -> List[float]:
    """The mean of the last ``window`` values at every step (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in str(text)).strip("-")
