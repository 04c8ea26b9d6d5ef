"""Reports are pure functions of result rows: rows -> the results frame -> each task's tables (from the task's
:class:`~upbench.protocols.TableSpec`, found through :data:`upbench.registry.TASKS`) -> Markdown / LaTeX / CSV /
HTML.  :mod:`.tables` builds and renders metric tables; :mod:`.scaling` the sweep's tables and figure."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ..registry import TASKS
from ..results import frame as results_frame
from .scaling import fit_slope, scaling_csv, scaling_summary, scaling_tables
from .tables import RENDERERS, Table, task_tables, to_csv, to_html, to_latex, to_markdown

__all__ = ["render", "tables_for", "all_tables", "Table", "task_tables", "scaling_tables", "scaling_summary",
           "scaling_csv", "fit_slope", "to_markdown", "to_latex", "to_csv", "to_html"]


def tables_for(rows: Sequence[Dict[str, Any]], paper: bool = False, rank_paper: bool = False) -> List[Table]:
    """Every task's tables, in the registry's order, for the tasks that have rows."""
    df = results_frame(rows)
    present = set(df["task"]) if len(df) else set()
    specs = [(name, task.table) for name, task in TASKS.items()
             if name in present and getattr(task, "table", None) is not None]
    out: List[Table] = []
    for name, spec in sorted(specs, key=lambda item: (item[1].position, item[0])):
        out += task_tables(df, name, spec, paper=paper, rank_paper=rank_paper)
    return out


def all_tables(rows: Sequence[Dict[str, Any]], paper: bool = False, rank_paper: bool = False) -> List[Table]:
    """Every task's tables, then the scaling sweep's."""
    return tables_for(rows, paper=paper, rank_paper=rank_paper) + scaling_tables(rows)


def render(rows: Sequence[Dict[str, Any]], fmt: str = "markdown", paper: bool = False, scaling: bool = False,
           rank_paper: bool = False) -> str:
    """The report in ``fmt`` (markdown, latex, csv, html): every table, or only the scaling sweep's with
    ``scaling`` (whose CSV is the tidy one-row-per-point form)."""
    if scaling and fmt == "csv":
        return scaling_csv(rows) if scaling_tables(rows) else "no finished results\n"
    tables = scaling_tables(rows) if scaling else all_tables(rows, paper=paper, rank_paper=rank_paper)
    if not tables:
        return "no finished results\n"
    return RENDERERS[fmt](tables)
