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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..protocols import TableSpec
from ..results import TABLE_DATASET_KEYS, flat, protocol

Column = Tuple[str, str]   # (group, name); group "" = not under a dataset

DATASET_ORDER = ["cocostuff", "voc", "ade20k", "cityscapes", "coco_depth", "nyuv2", "faceshq", "lhq", "coco_captions",
                 "relaion"]
DATASET_LABELS = {"cocostuff": "COCO", "voc": "VOC", "ade20k": "ADE20K", "cityscapes": "Cityscapes", "demo": "Demo",
                  "coco_depth": "COCO depth", "nyuv2": "NYUv2", "demo_depth": "Demo depth",
                  "depth_folder": "Depth folder", "middlebury": "Middlebury", "faceshq": "FacesHQ", "lhq": "LHQ",
                  "demo_images": "Demo images", "image_folder": "Images", "coco_captions": "COCO-5k",
                  "relaion": "reLAION-5k", "image_captions": "Captioned images", "prompt_file": "Prompts",
                  "demo_prompts": "Demo prompts", "davis": "DAVIS-2017", "davis_mini": "DAVIS mini"}
DATASET_LABELS.update({"navi": "NAVI", "grabcut": "GrabCut", "berkeley": "Berkeley", "davis_interactive": "DAVIS",
                       "sbd": "SBD", "coco_instances": "COCO instances"})   # LoftUp Tables 3-4
#: the papers' row order (interpolation, classical filters, then local, then cross-attention methods, UPLiFT last);
#: others follow
UPSAMPLER_ORDER = ["nearest", "bilinear", "bicubic", "jbf", "guided_filter", "lift_2x", "lift", "featup", "naf",
                   "loftup", "jafar", "anyup", "uplift"]
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
    row_header: str = "Upsampler"
    spreads: Dict[Tuple[int, Column], Tuple[float, int]] = field(default_factory=dict)  # (row, col) -> (std, n)
    rank_reference: bool = False                                # rank the published rows with ours
    sources: List[List[str]] = field(default_factory=list)      # per row: the config hashes of the runs in it

    def frame(self):
        """The table as a pandas DataFrame: index = row labels, columns = MultiIndex (group, name)."""
        import pandas as pd

        return pd.DataFrame([[cells.get(c) for c in self.columns] for _, cells in self.rows],
                            index=pd.Index([label for label, _ in self.rows], name=self.row_header),
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
    if isinstance(w, str) and w:
        return Path(w).name
    return "–" if not rec.get("params") else "random init"


def _records(frame) -> List[Dict[str, Any]]:
    """The frame's rows as dicts, with pandas' missing values (NaN in mixed columns) back to None."""
    if frame is None or len(frame) == 0:
        return []
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
            for rec in frame.to_dict("records")]


# ----------------------------------------------------------------------------------------- what makes a protocol
def protocol_of(rec: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a table's cells must share (see :func:`upbench.results.protocol`) of a flat record."""
    return protocol(rec.get("config") or {}, rec.get("device"))


def upsampler_setup(rec: Mapping[str, Any]) -> Dict[str, Any]:
    return flat({k: v for k, v in ((rec.get("config") or {}).get("upsampler") or {}).items() if k != "name"})


def dataset_setup(rec: Mapping[str, Any]) -> Dict[str, Any]:
    ds = (rec.get("config") or {}).get("dataset") or {}
    return flat({k: v for k, v in ds.items() if k not in ("name", "cache_dir") and k not in TABLE_DATASET_KEYS})


def differing(settings: Sequence[Mapping[str, Any]]) -> List[str]:
    """The keys whose values are not the same in every one of ``settings`` (a missing key counts as a value)."""
    keys = sorted({k for st in settings for k in st})
    return [k for k in keys if len({json.dumps(st.get(k), sort_keys=True, default=str) for st in settings}) > 1]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return Path(text).name if isinstance(value, str) and "/" in value else text


def describe(setting: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_short(setting.get(k))}" for k in keys)


def _image_list(rec: Mapping[str, Any]) -> str:
    """``curated`` / ``all`` / ``list <file>``: which images of a set with a published list the run used (COCO)."""
    kind = rec.get("data.image_list")
    return str(kind) if kind else ""


def _column_key(rec: Mapping[str, Any]) -> Tuple[str, str, str]:
    return (rec["dataset"], json.dumps(dataset_setup(rec), sort_keys=True, default=str), _image_list(rec))


def _stats(values: Iterable[Any]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample standard deviation or None, n) of the numbers among ``values``."""
    nums = [n for n in (_number(v) for v in values) if n is not None]
    if not nums:
        return None, None, 0
    mean = sum(nums) / len(nums)
    std = math.sqrt(sum((x - mean) ** 2 for x in nums) / (len(nums) - 1)) if len(nums) > 1 else None
    return mean, std, len(nums)


def task_tables(frame, task: str, spec: TableSpec, paper: bool = False, rank_paper: bool = False) -> List[Table]:
    """The tables of ``task``'s rows in the results frame.

    A table holds runs of one protocol only: one table per value of ``spec.group_by`` and per distinct protocol
    (:func:`protocol_of`); tables of the same group that differ in their protocol name the keys that split them.
    Within a table a row is an upsampler with one setup (two setups of one upsampler are two rows, labelled by what
    differs) and a column group is a dataset with one setup; a cell averages the seeds of identical runs and
    carries their standard deviation and count."""
    recs = [r for r in _records(frame) if r.get("task") == task and r.get("status") in ("ok", "skipped")]
    groups: Dict[Tuple[Any, ...], Dict[str, List[Dict[str, Any]]]] = {}
    protocols: Dict[str, Dict[str, Any]] = {}
    for r in recs:
        proto = protocol_of(r)
        pkey = json.dumps(proto, sort_keys=True, default=str)
        protocols[pkey] = proto
        gkey = tuple(group_value(r, k) for k in spec.group_by)
        groups.setdefault(gkey, {}).setdefault(pkey, []).append(r)
    ref = paper_tables() if (paper or rank_paper) else None
    tables = []
    for gkey in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        by_protocol = groups[gkey]
        split = differing([protocols[p] for p in by_protocol])
        for pkey in sorted(by_protocol, key=lambda p: describe(protocols[p], split)):
            table = _one_table(task, spec, gkey, by_protocol[pkey], protocols[pkey], split, ref)
            table.rank_reference = rank_paper
            tables.append(table)
    return tables


def _one_table(task: str, spec: TableSpec, gkey: Tuple[Any, ...], grp: List[Dict[str, Any]], protocol: Dict[str, Any],
               split: List[str], ref: Optional[Dict[str, Any]]) -> Table:
    # columns: one group per (dataset, dataset setup); rows: one per (method, upsampler setup)
    datasets = order((r["dataset"] for r in grp), DATASET_ORDER)
    ds_keys = {d: differing([dataset_setup(r) for r in grp if r["dataset"] == d]) for d in datasets}
    columns_of: Dict[Tuple[str, str], str] = {}
    for d in datasets:
        for r in grp:
            if r["dataset"] == d:
                label = DATASET_LABELS.get(d, d)
                extra = ", ".join(x for x in (describe(dataset_setup(r), ds_keys[d]),
                                              _image_list(r)) if x)
                columns_of[_column_key(r)] = f"{label} ({extra})" if extra else label
    ds_groups = list(dict.fromkeys(columns_of.values()))
    cols: List[Column] = [PARAMS, TIME] + [(g, m.label) for g in ds_groups for m in spec.metrics] + [WEIGHTS]
    if any(r.get("note") for r in grp):
        cols.append(NOTE)
    better = {TIME: "min", **{(g, m.label): m.better for g in ds_groups for m in spec.metrics}}
    formats = {PARAMS: "{:.2f}", TIME: "{:.1f}", **{(g, m.label): m.fmt for g in ds_groups for m in spec.metrics}}
    names = [spec.group_labels.get(k, k.split(".")[-1]) for k in spec.group_by]
    title = spec.title + " - " + ", ".join(f"{n} {v}" for n, v in zip(names, gkey) if v is not None)
    if split:
        shown = [k for k in split if k == "protocol.name"] or split   # a preset's name says the rest
        title += " [" + describe(protocol, shown) + "]"
    table = Table(title, cols, better=better, formats=formats, key=gkey + tuple(protocol.get(k) for k in split))
    if split:
        table.notes.append("tables of this group are split by " + ", ".join(split) + " (a cell never averages runs "
                           "with different settings)")

    def column_group(r: Dict[str, Any]) -> str:
        return columns_of[_column_key(r)]

    by_row: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in grp:
        by_row.setdefault((r["method"], json.dumps(upsampler_setup(r), sort_keys=True, default=str)), []).append(r)
    methods = order((m for m, _ in by_row), UPSAMPLER_ORDER)
    for method in methods:
        setups = [k for k in by_row if k[0] == method]
        keys = differing([json.loads(k[1]) for k in setups])
        for k in sorted(setups, key=lambda k: k[1]):
            rs = by_row[k]
            extra = describe(json.loads(k[1]), keys)
            label = f"{method} ({extra})" if extra else method
            row = len(table.rows)
            cells: Dict[Column, Any] = {
                PARAMS: (rs[0]["params"] / 1e6) if _number(rs[0].get("params")) else None,
                TIME: _mean(r.get("timing.upsampler_ms") for r in rs),
                WEIGHTS: _weights_label(rs[0]),
                NOTE: "; ".join(sorted({r["note"] for r in rs if isinstance(r.get("note"), str)})) or None,
            }
            for g in ds_groups:
                done = [r for r in rs if column_group(r) == g and r.get("status") == "ok"]
                for m in spec.metrics:
                    mean, std, n = _stats(r.get(f"metric.{m.key}") for r in done)
                    cells[(g, m.label)] = mean
                    if n > 1:
                        table.spreads[(row, (g, m.label))] = (std or 0.0, n)
            table.rows.append((label, cells))
            table.sources.append([r.get("config_hash") for r in rs if r.get("config_hash")])
    if spec.baseline:
        label, suffix = spec.baseline
        done = [r for r in grp if r.get("status") == "ok"]
        data = {k[5:]: v for k, v in (done[0] if done else {}).items() if k.startswith("data.")}
        cells = {WEIGHTS: "–"}
        for g in ds_groups:
            for m in spec.metrics:
                cells[(g, m.label)] = _mean(r.get(f"metric.{m.key}{suffix}") for r in done if column_group(r) == g)
        try:
            table.rows.append((label.format(**data), cells))
        except (KeyError, IndexError):
            table.rows.append((label, cells))
    if any(n > 1 for _, n in table.spreads.values()):
        table.notes.append("mean ± standard deviation over n runs that differ only in their seed")
    backbone = grp[0].get("backbone")
    if ref and backbone in spec.paper:
        for pr in ref[spec.paper[backbone]]["rows"]:
            cells = {PARAMS: pr.get("params_m"), TIME: pr.get("time_ms"), WEIGHTS: "published"}
            for d in datasets:
                vals = pr.get(task, pr).get(spec.paper_datasets.get(d, d), {})
                for g in {column_group(r) for r in grp if r["dataset"] == d}:
                    for m in spec.metrics:
                        cells[(g, m.label)] = vals.get(spec.paper_metrics.get(m.key, m.key))
            table.rows.append((f"{pr['label']} (paper)", cells))
            table.reference_rows += 1
        source = ref[spec.paper[backbone]].get("source", ref["source"])   # a table from another paper names it
        table.notes.append("(paper) rows: published numbers, " + source + "; paper times are GPU ms.")
    return table


# -------------------------------------------------------------------------------------------------- rendering
def ranks(table: Table) -> Dict[Tuple[int, Column], int]:
    """(row index, column) -> 1 for the best, 2 for the second best value, among the measured rows (and the
    published ones when the table says so)."""
    out = {}
    ranked = table.rows if table.rank_reference else table.rows[: len(table.rows) - table.reference_rows]
    for col, how in table.better.items():
        vals = sorted({round(v, 6) for v in (_number(c.get(col)) for _, c in ranked) if v is not None},
                      reverse=(how == "max"))
        for i, (_, cells) in enumerate(ranked):
            v = _number(cells.get(col))
            if v is not None and len(vals) > 1:
                rank = vals.index(round(v, 6)) + 1
                if rank <= 2:
                    out[(i, col)] = rank
    return out


def fmt(table: Table, value: Any, col: Column, minus: str = "-") -> str:
    """A cell as text; ``minus``: the character for negative numbers (a real minus sign in typeset output)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = table.formats.get(col, "{:.2f}").format(value)
        return minus + text[1:] if text.startswith("-") else text
    return str(value)


def spread(table: Table, row: int, col: Column, pm: str = " ± ", minus: str = "-") -> str:
    """`` ± std (n)`` for a cell averaged over several seeds, else ``""``."""
    if (row, col) not in table.spreads:
        return ""
    std, n = table.spreads[(row, col)]
    return f"{pm}{fmt(table, std, col, minus)} ({n})"


def header(col: Column) -> str:
    return f"{col[0]} {col[1]}".strip()


def to_markdown(tables: Sequence[Table]) -> str:
    """GitHub Markdown; the best value of a column in **bold**, the second in _italics_ (both read in plain text);
    published rows below a ``published`` line."""
    out = []
    for t in tables:
        rk = ranks(t)
        head = [t.row_header] + [header(c) for c in t.columns]
        lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, (label, cells) in enumerate(t.rows):
            if t.reference_rows and i == len(t.rows) - t.reference_rows:
                lines.append("| *published* |" + " |" * len(t.columns))
            vals = []
            for col in t.columns:
                s = fmt(t, cells.get(col), col)
                rank = rk.get((i, col))
                s = f"**{s}**" if rank == 1 else f"_{s}_" if rank == 2 else s
                vals.append(s + spread(t, i, col))
            lines.append("| " + " | ".join([label] + vals) + " |")
        lines += [f"\n{n}" for n in t.notes]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "δ": r"$\delta$",
        "−": "$-$", "±": r"$\pm$", "→": r"$\rightarrow$", "×": r"$\times$"}
#: a table whose estimated natural width exceeds this (points; an article's text width is 345 pt) is scaled to it
LATEX_TEXT_WIDTH_PT = 345.0


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


def _label(t: Table) -> Optional[str]:
    if not t.key:
        return None
    text = "-".join(str(k) for k in t.key)
    return "tab:" + "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def to_latex(tables: Sequence[Table]) -> str:
    """booktabs tables (``\\usepackage{booktabs,graphicx}``) through pandas' Styler, each in a ``table`` float with a
    caption and label: one ``\\multicolumn`` per dataset spanning exactly its metric columns, a ``\\cmidrule``
    under each, text columns left-aligned, real minus signs, the best value \\textbf{bold} and the second
    \\underline{underlined}, published rows below a ``\\midrule``; tables wider than
    the text width (estimated from their cells) are scaled to ``\\linewidth``."""
    import pandas as pd

    out = []
    for t in tables:
        rk = ranks(t)
        body = []
        for i, (label, cells) in enumerate(t.rows):
            vals = [tex(label)]
            for col in t.columns:
                s = tex(fmt(t, cells.get(col), col, minus="−"))
                rank = rk.get((i, col))
                s = rf"\textbf{{{s}}}" if rank == 1 else rf"\underline{{{s}}}" if rank == 2 else s
                vals.append(s + tex(spread(t, i, col, pm="±", minus="−")))
            body.append(vals)
        grouped = any(g for g, _ in t.columns)
        if grouped:
            columns = pd.MultiIndex.from_tuples([("", tex(t.row_header))] + [(tex(g), tex(n)) for g, n in t.columns])
        else:
            columns = pd.Index([tex(t.row_header)] + [tex(n) for _, n in t.columns])
        frame = pd.DataFrame(body, columns=columns)
        numeric = {c for c in t.better} | {PARAMS}
        align = "l" + "".join("r" if col in numeric or _is_numeric_column(t, col) else "l" for col in t.columns)
        latex = frame.style.hide(axis="index").to_latex(
            column_format=align, hrules=True, multicol_align="c", caption=tex(t.title), label=_label(t),
            position_float="centering")
        lines = latex.splitlines()
        if grouped:
            top = next(i for i, line in enumerate(lines) if line.startswith(r"\toprule")) + 1
            rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for g, a, b in _spans(t.columns) if g)
            if rules:
                lines.insert(top + 1, rules)
        if t.reference_rows:
            first = next(i for i, line in enumerate(lines) if line.startswith(r"\midrule")) + 1
            lines.insert(first + len(t.rows) - t.reference_rows, r"\midrule")
        if _natural_width_pt(t, body) > LATEX_TEXT_WIDTH_PT:
            b = next(i for i, line in enumerate(lines) if line.startswith(r"\begin{tabular}"))
            e = next(i for i, line in enumerate(lines) if line.startswith(r"\end{tabular}"))
            lines[b] = r"\resizebox{\linewidth}{!}{%" + "\n" + lines[b]
            lines[e] = lines[e] + "}"
        notes = [f"% {n}" for n in t.notes]
        out.append("\n".join([f"% {t.title}"] + lines + notes))
    return "\n\n".join(out) + "\n"


def _natural_width_pt(t: Table, body: Sequence[Sequence[str]]) -> float:
    """A table's width at 10 pt, roughly: each column as wide as its longest cell or header (about 5 pt a character
    once markup is removed) plus the column separation."""
    def chars(text: str) -> int:
        return len(re.sub(r"\\[a-zA-Z]+|[{}$]", "", text))

    headers = [t.row_header] + [n for _, n in t.columns]
    width = 0.0
    for j, head in enumerate(headers):
        longest = max([chars(head)] + [chars(row[j]) for row in body])
        width += 5.0 * longest + 12.0
    return width


def _is_numeric_column(t: Table, col: Column) -> bool:
    values = [c.get(col) for _, c in t.rows if c.get(col) not in (None, "–")]
    return bool(values) and all(_number(v) is not None or _looks_numeric(v) for v in values)


def _looks_numeric(v: Any) -> bool:
    text = str(v).rstrip("*†‡ ").split(" ")[0].replace("−", "-")
    try:
        float(text)
        return True
    except ValueError:
        return False


def to_csv(tables: Sequence[Table]) -> str:
    """One line per table row: the table's title, the row label, then every column (``group/name``), one value per
    cell; a seed-averaged cell adds ``<column> std`` and ``<column> n`` columns."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    all_cols = list(dict.fromkeys(c for t in tables for c in t.columns))
    spread_cols = list(dict.fromkeys(c for t in tables for (_, c) in t.spreads))
    name = lambda c: f"{c[0]}/{c[1]}" if c[0] else c[1]  # noqa: E731
    writer.writerow(["table", "row"] + [name(c) for c in all_cols] + [f"{name(c)} std" for c in spread_cols]
                    + [f"{name(c)} n" for c in spread_cols])
    for t in tables:
        for i, (label, cells) in enumerate(t.rows):
            writer.writerow([t.title, label] + ["" if cells.get(c) is None else cells.get(c) for c in all_cols]
                            + [t.spreads.get((i, c), ("", ""))[0] for c in spread_cols]
                            + [t.spreads.get((i, c), ("", ""))[1] for c in spread_cols])
    return buf.getvalue()


def to_html(tables: Sequence[Table], row_links: Optional[Sequence[Sequence[Optional[str]]]] = None) -> str:
    """HTML fragments, one ``<table>`` per table with a two-row header (datasets, then metrics); published rows
    have the class ``paper``.  ``row_links[i][j]``: an anchor the j-th row label of table i links to."""
    out = []
    for ti, t in enumerate(tables):
        rk = ranks(t)
        grouped = any(g for g, _ in t.columns)
        if grouped:
            top = "".join(f'<th colspan="{b - a + 1}">{html.escape(g)}</th>' for g, a, b in _spans(t.columns))
            sub = "".join(f"<th>{html.escape(n)}</th>" for _, n in t.columns)
            head = f'<tr><th rowspan="2">{html.escape(t.row_header)}</th>{top}</tr><tr>{sub}</tr>'
        else:
            head = f"<tr><th>{html.escape(t.row_header)}</th>" + "".join(
                f"<th>{html.escape(n)}</th>" for _, n in t.columns) + "</tr>"
        rows = []
        for i, (label, cells) in enumerate(t.rows):
            tds = []
            for col in t.columns:
                s = html.escape(fmt(t, cells.get(col), col, minus="−"))
                rank = rk.get((i, col))
                s = f"<strong>{s}</strong>" if rank == 1 else f"<u>{s}</u>" if rank == 2 else s
                tds.append(f"<td>{s}{html.escape(spread(t, i, col, minus='−'))}</td>")
            cls = ' class="paper"' if i >= len(t.rows) - t.reference_rows else ""
            link = row_links[ti][i] if row_links and i < len(row_links[ti]) else None
            name = f'<a href="#{link}">{html.escape(label)}</a>' if link else html.escape(label)
            rows.append(f"<tr{cls}><th>{name}</th>{''.join(tds)}</tr>")
        notes = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in t.notes)
        out.append(f"<h3>{html.escape(t.title)}</h3>\n<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows)
                   + f"\n</tbody>\n</table>\n{notes}")
    return "\n".join(out) + "\n"


RENDERERS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}
