"""Reports are pure functions of result rows: rows -> tables -> Markdown / LaTeX (booktabs) / CSV."""
from __future__ import annotations

import csv
import io
import json
import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

DATASET_ORDER = ["cocostuff", "voc", "ade20k", "cityscapes", "coco_depth", "nyuv2", "faceshq", "lhq", "coco_captions",
                 "relaion"]
DATASET_LABELS = {"cocostuff": "COCO", "voc": "VOC", "ade20k": "ADE20K", "cityscapes": "Cityscapes", "demo": "Demo",
                  "coco_depth": "COCO depth", "nyuv2": "NYUv2", "demo_depth": "Demo depth",
                  "depth_folder": "Depth folder", "middlebury": "Middlebury", "faceshq": "FacesHQ", "lhq": "LHQ",
                  "demo_images": "Demo images", "image_folder": "Images", "coco_captions": "COCO-5k",
                  "relaion": "reLAION-5k", "image_captions": "Captioned images", "prompt_file": "Prompts",
                  "demo_prompts": "Demo prompts"}
UPSAMPLER_ORDER = ["nearest", "bilinear", "lift_2x", "lift", "featup", "loftup", "jafar", "anyup", "uplift"]
#: (task, backbone) -> the paper table holding published numbers for it
PAPER_TABLES = {("seg", "dinov2_s14"): "table1", ("depth", "dinov2_s14"): "table1",
                ("seg", "dinov3_splus16"): "table8", ("generative", "sd15_vae"): "table4",
                ("t2i_upscale", "sd15_vae"): "table2_3"}
#: the papers' depth probe runs on COCO images (pseudo ground truth), stored under "cocostuff"; metric names
PAPER_DATASET_KEYS = {("depth", "coco_depth"): "cocostuff"}
PAPER_METRIC_KEYS = {"d1": "delta1"}


@dataclass
class Table:
    title: str
    columns: List[Tuple[str, str]]                     # (group, name); group "" = ungrouped
    rows: List[Tuple[str, Dict[Tuple[str, str], Any]]] = field(default_factory=list)
    better: Dict[Tuple[str, str], str] = field(default_factory=dict)   # column -> "max" | "min"
    reference_rows: int = 0                             # trailing rows that are published numbers (not ranked)
    notes: List[str] = field(default_factory=list)
    key: Tuple[Any, ...] = ()                           # the group the table was made from


def paper_tables() -> Dict[str, Any]:
    return json.loads((Path(__file__).parent / "assets" / "paper_tables.json").read_text())


def _order(names: Iterable[str], preferred: Sequence[str]) -> List[str]:
    names = list(dict.fromkeys(names))
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def _mean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _weights_label(row: Dict[str, Any]) -> str:
    cfg = row.get("config", {}).get("upsampler", {})
    w = cfg.get("weights")
    if w:
        return Path(str(w)).name
    return "–" if row.get("params", {}).get("upsampler", 0) == 0 else "random init"


def _metric_tables(rows: Sequence[Dict[str, Any]], task: str, metrics: Sequence[Tuple[str, str, str]],
                   group_of, title_of, paper: bool = False) -> List[Table]:
    """Rows = upsamplers, columns = params, time, then each metric per dataset; one table per group.
    ``metrics``: (row key, column label, "max" | "min"). Repeated runs (seeds) are averaged."""
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") == task and r.get("status") in ("ok", "skipped"):
            groups[group_of(r)].append(r)
    ref = paper_tables() if paper else None
    tables = []
    for key, grp in sorted(groups.items()):
        datasets = _order((r["dataset"] for r in grp), DATASET_ORDER)
        labels = {d: DATASET_LABELS.get(d, d) for d in datasets}
        cols = [("", "Params (M)"), ("", "Time (ms)")]
        cols += [(labels[d], label) for d in datasets for _, label, _ in metrics]
        cols.append(("", "Weights"))
        if any(r.get("note") for r in grp):
            cols.append(("", "Note"))
        better = {("", "Time (ms)"): "min"}
        better.update({(labels[d], label): how for d in datasets for _, label, how in metrics})
        table = Table(title_of(key), cols, better=better, key=key)
        by_up: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for r in grp:
            by_up[r["upsampler"]].append(r)
        for up in _order(by_up, UPSAMPLER_ORDER):
            rs = by_up[up]
            cells: Dict[Tuple[str, str], Any] = {
                ("", "Params (M)"): (rs[0]["params"]["upsampler"] / 1e6) if rs[0]["params"]["upsampler"] else None,
                ("", "Time (ms)"): _mean([r.get("timing", {}).get("upsampler_ms") for r in rs]),
                ("", "Weights"): _weights_label(rs[0]),
                ("", "Note"): "; ".join(sorted({r["note"] for r in rs if r.get("note")})) or None,
            }
            for d in datasets:
                done = [r for r in rs if r["dataset"] == d and r.get("status") == "ok"]
                for metric, label, _ in metrics:
                    cells[(labels[d], label)] = _mean([r["metrics"].get(metric) for r in done])
            table.rows.append((up, cells))
        backbone = key[0]
        if ref and (task, backbone) in PAPER_TABLES:
            for pr in ref[PAPER_TABLES[(task, backbone)]]["rows"]:
                cells = {("", "Params (M)"): pr.get("params_m"), ("", "Time (ms)"): pr.get("time_ms"),
                         ("", "Weights"): "published"}
                for d in datasets:
                    vals = pr.get(task, pr).get(PAPER_DATASET_KEYS.get((task, d), d), {})
                    for metric, label, _ in metrics:
                        cells[(labels[d], label)] = vals.get(PAPER_METRIC_KEYS.get(metric, metric))
                table.rows.append((f"{pr['label']} (paper)", cells))
                table.reference_rows += 1
            table.notes.append("(paper) rows: published numbers, " + ref["source"] + "; paper times are GPU ms.")
        tables.append(table)
    return tables


def seg_tables(rows: Sequence[Dict[str, Any]], paper: bool = False) -> List[Table]:
    """UPLiFT Table 1 layout, one table per (backbone, lr_schedule): mIoU / Acc per dataset."""
    def group(r):
        return (r["backbone"], r.get("config", {}).get("task", {}).get("probe", {}).get("lr_schedule", "?"))

    return _metric_tables(rows, "seg", [("miou", "mIoU", "max"), ("acc", "Acc", "max")], group,
                          lambda k: f"Segmentation linear probes - backbone {k[0]}, lr_schedule {k[1]}", paper)


def depth_tables(rows: Sequence[Dict[str, Any]], paper: bool = False) -> List[Table]:
    """UPLiFT Table 1 depth columns, one table per (backbone, lr_schedule): delta1 (%) / RMSE per dataset."""
    def group(r):
        return (r["backbone"], r.get("config", {}).get("task", {}).get("probe", {}).get("lr_schedule", "?"))

    return _metric_tables(rows, "depth", [("d1", "δ1", "max"), ("rmse", "RMSE", "min")], group,
                          lambda k: f"Depth linear probes - backbone {k[0]}, lr_schedule {k[1]}", paper)


def generative_tables(rows: Sequence[Dict[str, Any]], paper: bool = False) -> List[Table]:
    """UPLiFT Table 4 layout, one table per VAE: SSIM / PSNR / FID / patch-FID per image set."""
    return _metric_tables(rows, "generative", [("ssim", "SSIM", "max"), ("psnr", "PSNR", "max"), ("fid", "FID", "min"),
                                               ("pfid", "p-FID", "min")],
                          lambda r: (r["backbone"],),
                          lambda k: f"VAE-latent super-resolution - VAE {k[0]}", paper)


def t2i_tables(rows: Sequence[Dict[str, Any]], paper: bool = False) -> List[Table]:
    """UPLiFT Tables 2-3 layout, one table per (VAE, base size, factor): FID / p-FID / CLIP per prompt set, plus
    a row for the base images themselves (no upscaling), averaged over the runs that generated them."""
    metrics = [("fid", "FID", "min"), ("pfid", "p-FID", "min"), ("clip", "CLIP", "max")]

    def group(r):
        d = r.get("data", {})
        return (r["backbone"], d.get("base_size"), d.get("out_size"))

    tables = _metric_tables(rows, "t2i_upscale", metrics, group,
                            lambda k: f"Text-to-image upscaling {k[1]} -> {k[2]} - VAE {k[0]}", paper)
    for table in tables:
        done = [r for r in rows if r.get("task") == "t2i_upscale" and r.get("status") == "ok"
                and group(r) == table.key]
        cells: Dict[Tuple[str, str], Any] = {("", "Weights"): "–"}
        for d in {r["dataset"] for r in done}:
            label = DATASET_LABELS.get(d, d)
            for metric, name, _ in metrics:
                cells[(label, name)] = _mean([r["metrics"].get(f"{metric}_base") for r in done if r["dataset"] == d])
        # the base row goes before the published rows, so it is ranked with ours
        table.rows.insert(len(table.rows) - table.reference_rows, (f"no upscaling ({table.key[1]} px)", cells))
    return tables


def recon_tables(rows: Sequence[Dict[str, Any]]) -> List[Table]:
    """Feature reconstruction (task=recon), one table per backbone: MSE / cosine per dataset."""
    return _metric_tables(rows, "recon", [("mse", "MSE", "min"), ("cosine", "Cosine", "max")],
                          lambda r: (r["backbone"],),
                          lambda k: f"Feature reconstruction (2x, vs backbone features of the 2x image) - backbone {k[0]}")


def _ranks(table: Table) -> Dict[Tuple[int, Tuple[str, str]], int]:
    """(row index, column) -> 1 for best, 2 for second best, among the measured rows."""
    out = {}
    measured = table.rows[: len(table.rows) - table.reference_rows]
    for col, how in table.better.items():
        vals = sorted({round(c[col], 6) for _, c in measured if isinstance(c.get(col), (int, float))},
                      reverse=(how == "max"))
        for i, (_, cells) in enumerate(measured):
            v = cells.get(col)
            if isinstance(v, (int, float)) and len(vals) > 1:
                rank = vals.index(round(v, 6)) + 1
                if rank <= 2:
                    out[(i, col)] = rank
    return out


def _fmt(value: Any, col: Tuple[str, str]) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if col[1] == "Time (ms)":
            return f"{value:.1f}"
        return f"{value:.4f}" if col[1] == "Cosine" else f"{value:.3f}" if col[1] in ("RMSE", "SSIM") else f"{value:.2f}"
    return str(value)


def to_markdown(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        ranks = _ranks(t)
        head = ["Upsampler"] + [f"{g} {n}".strip() for g, n in t.columns]
        lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, (label, cells) in enumerate(t.rows):
            vals = []
            for col in t.columns:
                s = _fmt(cells.get(col), col)
                rank = ranks.get((i, col))
                vals.append(f"**{s}**" if rank == 1 else f"<u>{s}</u>" if rank == 2 else s)
            lines.append("| " + " | ".join([label] + vals) + " |")
        lines += [f"\n{n}" for n in t.notes]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _tex(s: str) -> str:
    return (s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("–", "--")
            .replace("δ", r"$\delta$"))


def to_latex(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        ranks = _ranks(t)
        groups = list(OrderedDict.fromkeys(g for g, _ in t.columns))
        spec = "l" + "r" * len(t.columns)
        lines = [f"% {t.title}", r"\begin{tabular}{" + spec + "}", r"\toprule"]
        top, rules, col_idx = ["Upsampler"], [], 2
        for g in groups:
            span = sum(1 for gg, _ in t.columns if gg == g)
            if g:
                top.append(rf"\multicolumn{{{span}}}{{c}}{{{_tex(g)}}}")
                rules.append(rf"\cmidrule(lr){{{col_idx}-{col_idx + span - 1}}}")
            else:
                top += [""] * span
            col_idx += span
        lines.append(" & ".join(top) + r" \\")
        if rules:
            lines.append(" ".join(rules))
        lines.append(" & ".join([""] + [_tex(n) for _, n in t.columns]) + r" \\")
        lines.append(r"\midrule")
        for i, (label, cells) in enumerate(t.rows):
            if i == len(t.rows) - t.reference_rows and t.reference_rows:
                lines.append(r"\midrule")
            vals = []
            for col in t.columns:
                s = _tex(_fmt(cells.get(col), col))
                rank = ranks.get((i, col))
                vals.append(rf"\textbf{{{s}}}" if rank == 1 else rf"\underline{{{s}}}" if rank == 2 else s)
            lines.append(" & ".join([_tex(label)] + vals) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def to_csv(tables: Sequence[Table]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["table", "upsampler"] + [f"{g}/{n}" if g else n for g, n in
                                              OrderedDict.fromkeys(c for t in tables for c in t.columns)])
    all_cols = list(OrderedDict.fromkeys(c for t in tables for c in t.columns))
    for t in tables:
        for label, cells in t.rows:
            writer.writerow([t.title, label] + ["" if cells.get(c) is None else cells.get(c) for c in all_cols])
    return buf.getvalue()


def render(rows: Sequence[Dict[str, Any]], fmt: str = "markdown", paper: bool = False, scaling: bool = False) -> str:
    tables = scaling_tables(rows) if scaling else (seg_tables(rows, paper=paper) + depth_tables(rows, paper=paper)
                                                   + generative_tables(rows, paper=paper) + t2i_tables(rows, paper=paper)
                                                   + recon_tables(rows))
    if not tables:
        return "no finished results\n"
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](tables)


# ----------------------------------------------------------------------------------------------------------------
# scaling sweeps (task=scaling): time / memory versus tokens
# ----------------------------------------------------------------------------------------------------------------
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
        rs = sorted(by_up[up], key=lambda r: r["tokens"])
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
            "family": rs[0].get("family", "learned"),
            "params_m": (rs[0].get("params", {}).get("upsampler") or 0) / 1e6,
            "time_slope": fit_slope([r["tokens"] for r in timed], [r["timing"]["median_ms"] for r in timed]),
            "time_slope_single": timed_star,
            "time_slope_top": fit_slope([r["tokens"] for r in top], [r["timing"]["median_ms"] for r in top])
            if len(top) == 3 else None,
            "memory_slope": fit_slope([r["tokens"] for r in mem], [r["memory"]["peak_mb"] for r in mem]),
            "max_tokens": reached[-1]["tokens"] if reached else None,
            "max_size": reached[-1]["size"] if reached else None,
            "stopped": (f"{SCALING_FAIL_LABELS[failed[0]['status']]} at {failed[0]['tokens']}" if failed else
                        "time limit" if rs[-1]["status"] == "time_limit" else "–"),
            "gflops": {r["tokens"]: r.get("gflops") for r in rs},
        }
    return out


def scaling_tables(rows: Sequence[Dict[str, Any]]) -> List[Table]:
    """Per (backbone, device, dtype, threads, cap): forward time and peak memory (rows = tokens, columns =
    upsamplers), then a summary per upsampler with the log-log slopes and the largest token count reached."""
    tables = []
    for key, grp in sorted(_scaling_groups(rows).items()):
        title = " - ".join(k for k in key if k)
        ups = _order((r["upsampler"] for r in grp), UPSAMPLER_ORDER)
        cell = {(r["upsampler"], r["tokens"]): r for r in grp}
        tokens = sorted({r["tokens"] for r in grp})
        size_of = {r["tokens"]: r["size"] for r in grp}
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
        recs.append({"upsampler": r["upsampler"], "tokens": r["tokens"], "status": r["status"],
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
