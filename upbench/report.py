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

DATASET_ORDER = ["cocostuff", "voc", "ade20k", "cityscapes"]
DATASET_LABELS = {"cocostuff": "COCO", "voc": "VOC", "ade20k": "ADE20K", "cityscapes": "Cityscapes", "demo": "Demo"}
UPSAMPLER_ORDER = ["nearest", "bilinear", "lift_2x", "lift", "featup", "loftup", "jafar", "anyup", "uplift"]
PAPER_BACKBONE_TABLES = {"dinov2_s14": "table1", "dinov3_splus16": "table8"}


@dataclass
class Table:
    title: str
    columns: List[Tuple[str, str]]                     # (group, name); group "" = ungrouped
    rows: List[Tuple[str, Dict[Tuple[str, str], Any]]] = field(default_factory=list)
    better: Dict[Tuple[str, str], str] = field(default_factory=dict)   # column -> "max" | "min"
    reference_rows: int = 0                             # trailing rows that are published numbers (not ranked)
    notes: List[str] = field(default_factory=list)


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
        table = Table(title_of(key), cols, better=better)
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
                    cells[(labels[d], label)] = _mean([r["metrics"][metric] for r in done])
            table.rows.append((up, cells))
        backbone = key[0]
        if ref and task == "seg" and backbone in PAPER_BACKBONE_TABLES:
            for pr in ref[PAPER_BACKBONE_TABLES[backbone]]["rows"]:
                cells = {("", "Params (M)"): pr.get("params_m"), ("", "Time (ms)"): pr.get("time_ms"),
                         ("", "Weights"): "published"}
                for d in datasets:
                    vals = pr.get("seg", {}).get(d, {})
                    for metric, label, _ in metrics:
                        cells[(labels[d], label)] = vals.get(metric)
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
        return f"{value:.4f}" if col[1] == "Cosine" else f"{value:.2f}"
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
    return s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("–", "--")


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


def render(rows: Sequence[Dict[str, Any]], fmt: str = "markdown", paper: bool = False) -> str:
    tables = seg_tables(rows, paper=paper) + recon_tables(rows)
    if not tables:
        return "no finished results\n"
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](tables)
