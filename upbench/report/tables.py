"""Probe / metric tables: a pure function of the results frame (:func:`upbench.results.frame`) and each task's
:class:`~upbench.protocols.TableSpec`, rendered to Markdown, LaTeX (pandas' Styler: booktabs, ``\\multicolumn``
group headers that span exactly their dataset's columns, best bold and second underlined in each metric's own
direction), CSV and HTML.

Rows are upsamplers; columns are parameters, time, then each metric per dataset, then the weights used.  Published
numbers (``--paper``) come last, below a rule, and are never ranked."""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..protocols import TableSpec

Column = Tuple[str, str]   # (group, name); group "" = not under a dataset

DATASET_ORDER = ["cocostuff", "voc", "ade20k", "cityscapes", "coco_depth", "nyuv2", "faceshq", "lhq", "coco_captions",
                 "relaion"]
DATASET_LABELS = {"cocostuff": "COCO", "voc": "VOC", "ade20k": "ADE20K", "cityscapes": "Cityscapes", "demo": "Demo",
                  "coco_depth": "COCO depth", "nyuv2": "NYUv2", "demo_depth": "Demo depth",
                  "depth_folder": "Depth folder", "middlebury": "Middlebury", "faceshq": "FacesHQ", "lhq": "LHQ",
                  "demo_images": "Demo images", "image_folder": "Images", "coco_captions": "COCO-5k",
                  "relaion": "reLAION-5k", "image_captions": "Captioned images", "prompt_file": "Prompts",
                  "demo_prompts": "Demo prompts"}
#: the papers' row order (interpolation, then local, then cross-attention methods, UPLiFT last); others follow
UPSAMPLER_ORDER = ["nearest", "bilinear", "lift_2x", "lift", "featup", "loftup", "jafar", "anyup", "uplift"]
PARAMS, TIME, WEIGHTS, NOTE = ("", "Params (M)"), ("", "Time (ms)"), ("", "Weights"), ("", "Note")
METHOD_HEADER = "Upsampler"


@dataclass
class Table:
    title: str
    columns: List[Column]
    rows: List[Tuple[str, Dict[Column, Any]]] = field(default_factory=list)
    better: Dict[Column, str] = field(default_factory=dict)    # column -> "max" | "min"
    formats: Dict[Column, str] = field(default_factory=dict)   # column -> "{:.2f}"
    reference_rows: int = 0                                     # trailing published rows (never ranked)
    notes: List[str] = field(default_factory=list)
    key: Tuple[Any, ...] = ()

    def frame(self):
        """The table as a pandas DataFrame: index = row labels, columns = MultiIndex (group, name)."""
        import pandas as pd

        return pd.DataFrame([[cells.get(c) for c in self.columns] for _, cells in self.rows],
                            index=pd.Index([label for label, _ in self.rows], name=METHOD_HEADER),
                            columns=pd.MultiIndex.from_tuples(self.columns))


def paper_tables() -> Dict[str, Any]:
    return json.loads((Path(__file__).resolve().parents[1] / "assets" / "paper_tables.json").read_text())


def order(names: Iterable[str], preferred: Sequence[str]) -> List[str]:
    names = [n for n in dict.fromkeys(names) if n is not None]
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def _number(v: Any) -> Optional[float]:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def _mean(values: Iterable[Any]) -> Optional[float]:
    nums = [n for n in (_number(v) for v in values) if n is not None]
    return sum(nums) / len(nums) if nums else None


def group_value(rec: Mapping[str, Any], key: str) -> Any:
    """A ``group_by`` key of a flat record: a column (``backbone``, ``data.base_size``) or a dotted config path."""
    if key in rec:
        return rec[key]
    if key.startswith("config."):
        obj: Any = rec.get("config") or {}
        for part in key.split(".")[1:]:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        return obj
    return None


def _weights_label(rec: Mapping[str, Any]) -> str:
    w = rec.get("weights")
    if w:
        return Path(str(w)).name
    return "–" if not rec.get("params") else "random init"


def _records(frame) -> List[Dict[str, Any]]:
    """The frame's rows as dicts, with pandas' missing values (NaN in mixed columns) back to None."""
    if frame is None or len(frame) == 0:
        return []
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
            for rec in frame.to_dict("records")]


def task_tables(frame, task: str, spec: TableSpec, paper: bool = False) -> List[Table]:
    """One table per value of ``spec.group_by`` for the rows of ``task`` in the results frame."""
    recs = [r for r in _records(frame) if r.get("task") == task and r.get("status") in ("ok", "skipped")]
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(tuple(group_value(r, k) for k in spec.group_by), []).append(r)
    ref = paper_tables() if paper else None
    tables = []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        grp = groups[key]
        datasets = order((r["dataset"] for r in grp), DATASET_ORDER)
        labels = {d: DATASET_LABELS.get(d, d) for d in datasets}
        cols: List[Column] = [PARAMS, TIME] + [(labels[d], m.label) for d in datasets for m in spec.metrics]
        cols.append(WEIGHTS)
        if any(r.get("note") for r in grp):
            cols.append(NOTE)
        better = {TIME: "min", **{(labels[d], m.label): m.better for d in datasets for m in spec.metrics}}
        formats = {PARAMS: "{:.2f}", TIME: "{:.1f}", **{(labels[d], m.label): m.fmt for d in datasets
                                                          for m in spec.metrics}}
        names = [spec.group_labels.get(k, k.split(".")[-1]) for k in spec.group_by]
        title = spec.title + " - " + ", ".join(f"{n} {v}" for n, v in zip(names, key))
        table = Table(title, cols, better=better, formats=formats, key=key)
        by_method: Dict[str, List[Dict[str, Any]]] = {}
        for r in grp:
            by_method.setdefault(r["method"], []).append(r)
        for method in order(by_method, UPSAMPLER_ORDER):
            rs = by_method[method]
            cells: Dict[Column, Any] = {
                PARAMS: (rs[0]["params"] / 1e6) if _number(rs[0].get("params")) else None,
                TIME: _mean(r.get("timing.upsampler_ms") for r in rs),
                WEIGHTS: _weights_label(rs[0]),
                NOTE: "; ".join(sorted({r["note"] for r in rs if isinstance(r.get("note"), str)})) or None,
            }
            for d in datasets:
                done = [r for r in rs if r["dataset"] == d and r.get("status") == "ok"]
                for m in spec.metrics:   # repeated runs (seeds) are averaged
                    cells[(labels[d], m.label)] = _mean(r.get(f"metric.{m.key}") for r in done)
            table.rows.append((method, cells))
        if spec.baseline:
            label, suffix = spec.baseline
            done = [r for r in grp if r.get("status") == "ok"]
            data = {k[5:]: v for k, v in (done[0] if done else {}).items() if k.startswith("data.")}
            cells = {WEIGHTS: "–"}
            for d in datasets:
                for m in spec.metrics:
                    cells[(labels[d], m.label)] = _mean(r.get(f"metric.{m.key}{suffix}") for r in done
                                                        if r["dataset"] == d)
            try:
                table.rows.append((label.format(**data), cells))
            except (KeyError, IndexError):
                table.rows.append((label, cells))
        backbone = grp[0].get("backbone")
        if ref and backbone in spec.paper:
            for pr in ref[spec.paper[backbone]]["rows"]:
                cells = {PARAMS: pr.get("params_m"), TIME: pr.get("time_ms"), WEIGHTS: "published"}
                for d in datasets:
                    vals = pr.get(task, pr).get(spec.paper_datasets.get(d, d), {})
                    for m in spec.metrics:
                        cells[(labels[d], m.label)] = vals.get(spec.paper_metrics.get(m.key, m.key))
                table.rows.append((f"{pr['label']} (paper)", cells))
                table.reference_rows += 1
            table.notes.append("(paper) rows: published numbers, " + ref["source"] + "; paper times are GPU ms.")
        tables.append(table)
    return tables


# -------------------------------------------------------------------------------------------------- rendering
def ranks(table: Table) -> Dict[Tuple[int, Column], int]:
    """(row index, column) -> 1 for the best, 2 for the second best value, among the measured rows."""
    out = {}
    measured = table.rows[: len(table.rows) - table.reference_rows]
    for col, how in table.better.items():
        vals = sorted({round(v, 6) for v in (_number(c.get(col)) for _, c in measured) if v is not None},
                      reverse=(how == "max"))
        for i, (_, cells) in enumerate(measured):
            v = _number(cells.get(col))
            if v is not None and len(vals) > 1:
                rank = vals.index(round(v, 6)) + 1
                if rank <= 2:
                    out[(i, col)] = rank
    return out


def fmt(table: Table, value: Any, col: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return table.formats.get(col, "{:.2f}").format(value)
    return str(value)


def header(col: Column) -> str:
    return f"{col[0]} {col[1]}".strip()


def to_markdown(tables: Sequence[Table]) -> str:
    """GitHub Markdown; the best value of a column in **bold**, the second in _italics_ (both read in plain text)."""
    out = []
    for t in tables:
        rk = ranks(t)
        head = [METHOD_HEADER] + [header(c) for c in t.columns]
        lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, (label, cells) in enumerate(t.rows):
            vals = []
            for col in t.columns:
                s = fmt(t, cells.get(col), col)
                rank = rk.get((i, col))
                vals.append(f"**{s}**" if rank == 1 else f"_{s}_" if rank == 2 else s)
            lines.append("| " + " | ".join([label] + vals) + " |")
        lines += [f"\n{n}" for n in t.notes]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "δ": r"$\delta$",
        "−": "$-$"}


def tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _spans(columns: Sequence[Column]) -> List[Tuple[str, int, int]]:
    """(group, first, last) 1-based column positions of every run of equal groups (after the label column)."""
    spans: List[Tuple[str, int, int]] = []
    for i, (g, _) in enumerate(columns, start=2):
        if spans and spans[-1][0] == g:
            spans[-1] = (g, spans[-1][1], i)
        else:
            spans.append((g, i, i))
    return spans


def to_latex(tables: Sequence[Table]) -> str:
    """booktabs tables through pandas' Styler: one ``\\multicolumn`` per dataset spanning exactly its metric
    columns, a ``\\cmidrule`` under each, text columns left-aligned, best \\textbf{bold}, second \\underline{underlined},
    published rows below a ``\\midrule``."""
    import pandas as pd

    out = []
    for t in tables:
        rk = ranks(t)
        body = []
        for i, (label, cells) in enumerate(t.rows):
            vals = [tex(label)]
            for col in t.columns:
                s = tex(fmt(t, cells.get(col), col))
                rank = rk.get((i, col))
                vals.append(rf"\textbf{{{s}}}" if rank == 1 else rf"\underline{{{s}}}" if rank == 2 else s)
            body.append(vals)
        columns = pd.MultiIndex.from_tuples([("", METHOD_HEADER)] + [(tex(g), tex(n)) for g, n in t.columns])
        frame = pd.DataFrame(body, columns=columns)
        align = "l" + "".join("r" if col in t.better or col == PARAMS else "l" for col in t.columns)
        latex = frame.style.hide(axis="index").to_latex(
            column_format=align, hrules=True, multicol_align="c", caption=tex(t.title),
            label="tab:" + "-".join(str(k) for k in t.key).replace("_", "-").replace(" ", "") if t.key else None,
            position_float="centering")
        lines = latex.splitlines()
        top = next(i for i, line in enumerate(lines) if line.startswith(r"\toprule")) + 1
        rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for g, a, b in _spans(t.columns) if g)
        if rules:
            lines.insert(top + 1, rules)
        if t.reference_rows:
            first = next(i for i, line in enumerate(lines) if line.startswith(r"\midrule")) + 1
            lines.insert(first + len(t.rows) - t.reference_rows, r"\midrule")
        notes = [f"% {n}" for n in t.notes]
        out.append("\n".join([f"% {t.title}"] + lines + notes))
    return "\n\n".join(out) + "\n"


def to_csv(tables: Sequence[Table]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    all_cols = list(dict.fromkeys(c for t in tables for c in t.columns))
    writer.writerow(["table", "upsampler"] + [f"{g}/{n}" if g else n for g, n in all_cols])
    for t in tables:
        for label, cells in t.rows:
            writer.writerow([t.title, label] + ["" if cells.get(c) is None else cells.get(c) for c in all_cols])
    return buf.getvalue()


def to_html(tables: Sequence[Table]) -> str:
    """HTML fragments, one ``<table>`` per table with a two-row header (datasets, then metrics)."""
    out = []
    for t in tables:
        rk = ranks(t)
        spans = _spans(t.columns)
        top = "".join(f'<th colspan="{b - a + 1}">{html.escape(g)}</th>' for g, a, b in spans)
        sub = "".join(f"<th>{html.escape(n)}</th>" for _, n in t.columns)
        rows = []
        for i, (label, cells) in enumerate(t.rows):
            tds = []
            for col in t.columns:
                s = html.escape(fmt(t, cells.get(col), col))
                rank = rk.get((i, col))
                tds.append(f"<td><strong>{s}</strong></td>" if rank == 1 else f"<td><u>{s}</u></td>" if rank == 2
                           else f"<td>{s}</td>")
            cls = ' class="paper"' if i >= len(t.rows) - t.reference_rows else ""
            rows.append(f"<tr{cls}><th>{html.escape(label)}</th>{''.join(tds)}</tr>")
        notes = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in t.notes)
        out.append(f"<h3>{html.escape(t.title)}</h3>\n<table>\n<thead><tr><th rowspan=\"2\">{METHOD_HEADER}</th>{top}"
                   f"</tr><tr>{sub}</tr></thead>\n<tbody>\n" + "\n".join(rows) + f"\n</tbody>\n</table>\n{notes}")
    return "\n".join(out) + "\n"


RENDERERS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}
