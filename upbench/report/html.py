"""``upbench report --html DIR``: one self-contained page (``DIR/index.html``): every table of the results, every
figure the results allow (embedded, so the page can be mailed or attached as it is), and the full config of every
run one click away (each table row links to the configs of its runs)."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import all_tables
from .tables import to_html

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
     padding:0 1rem;color:#222}
h1{font-size:1.6rem} h2{margin-top:2.5rem;border-bottom:1px solid #ddd} h3{font-size:1.05rem;margin-top:1.8rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}
th,td{border-top:1px solid #ccc;border-bottom:1px solid #ccc;padding:.25rem .6rem;text-align:right}
thead th{background:#f4f4f4;text-align:center} tbody th{text-align:left;font-weight:normal}
tr.paper{color:#666;font-style:italic;background:#fafafa}
p.note{font-size:.8rem;color:#555;margin:.2rem 0}
figure{margin:1.2rem 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.8rem;color:#555}
details{margin:.3rem 0} summary{cursor:pointer;font-size:.85rem} pre{font-size:.75rem;background:#f7f7f7;padding:.6rem;
     overflow-x:auto}
:target{outline:2px solid #f90}
"""


def _embed(png: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"data:image/png;base64,{data}"


def page(rows: Sequence[Mapping[str, Any]], figures: Mapping[str, Sequence[str]], paper: bool = False,
         title: str = "upbench report", source: str = "") -> str:
    """The report page as HTML text (pure: rows and figure files in, text out)."""
    tables = all_tables(list(rows), paper=paper)
    links = [[f"cfg-{hashes[0]}" if hashes else None for hashes in (t.sources or [])] for t in tables]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"note\">{len(rows)} result rows{(' from ' + html.escape(source)) if source else ''}; written "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}. Best value in each column "
             "<strong>bold</strong>, second <u>underlined</u>; a row label links to the configs of its runs.</p>",
             "<h2>Tables</h2>"]
    parts.append(to_html(tables, row_links=links) if tables else "<p>no finished results</p>")
    figs = [(kind, p) for kind, paths in figures.items() for p in paths if str(p).endswith(".png")]
    if figs:
        parts.append("<h2>Figures</h2>")
        for kind, png in figs:
            parts.append(f"<figure><img src=\"{_embed(png)}\" alt=\"{html.escape(kind)}: {html.escape(Path(png).name)}\">"
                         f"<figcaption>{html.escape(kind)}: {html.escape(Path(png).name)}</figcaption></figure>")
    parts.append("<h2>Configs of the runs</h2>")
    for r in sorted(rows, key=lambda r: (str(r.get("task")), str(r.get("upsampler")), str(r.get("dataset")))):
        key = r.get("config_hash", "")
        label = " ".join(str(r.get(k)) for k in ("task", "upsampler", "backbone", "dataset") if r.get(k))
        parts.append(f"<details id=\"cfg-{html.escape(key)}\"><summary>{html.escape(key)} - {html.escape(label)} "
                     f"({html.escape(str(r.get('status')))})</summary><pre>"
                     f"{html.escape(json.dumps(r.get('config'), indent=1, sort_keys=True, default=str))}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write(rows: Sequence[Mapping[str, Any]], out_dir: Path, figures: Mapping[str, Sequence[str]],
          paper: bool = False, source: str = "") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(page(rows, figures, paper=paper, source=source), encoding="utf-8")
    return path


def write_report(results: str, out_dir: str, paper: bool = False) -> Path:
    """``upbench report --html``: every figure the results allow (into ``<out_dir>/figures``) plus the figures already
    in ``<results>/figures`` and the runs' artefacts, then the page."""
    from .. import viz
    from ..results import ResultStore

    rows = ResultStore(results).rows()
    figures = {k: list(v) for k, v in viz.from_rows(rows, Path(results), Path(out_dir) / "figures").items()}
    known = {p for paths in figures.values() for p in paths}
    for folder in (Path(results) / "figures", Path(results) / "artefacts"):
        found = [str(p) for p in sorted(folder.rglob("*.png")) if str(p) not in known] if folder.is_dir() else []
        if found:
            figures[f"{folder.name}/"] = found
    return write(rows, Path(out_dir), figures, paper=paper, source=str(Path(results).resolve()))
