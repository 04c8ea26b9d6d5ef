"""The results store (atomic rows, strict JSON, skipped foreign files), the results DataFrame, and the generic table
builder: layout, ranking, published rows, and LaTeX whose group headers span exactly their dataset's columns."""
import json
import re
import warnings

import pytest

from upbench import report
from upbench.results import ResultStore, config_hash, frame, load
from upbench.schema import SCHEMA_VERSION, build_row


def _row(up, ds, miou, acc, ms=1.0, params=0, backbone="demo", sched="per_epoch", seed=0, task="seg"):
    cfg = {"task": {"name": task, "probe": {"lr_schedule": sched}}, "upsampler": {"name": up, "weights": None},
           "backbone": {"name": backbone}, "dataset": {"name": ds}, "seed": seed}
    return build_row(cfg, config_hash(cfg), "ok", metrics={"miou": miou, "acc": acc},
                     timing={"upsampler_ms": ms}, params={"upsampler": params})


def _seg(rows, paper=False):
    return report.task_tables(frame(rows), "seg", report.tables_for.__globals__["TASKS"].get("seg").table, paper)


def test_hash_ignores_paths_and_force_but_not_settings():
    a = {"seed": 0, "paths": {"results": "x"}, "force": False, "task": {"lr": 1}}
    assert config_hash(a) == config_hash({**a, "paths": {"results": "y"}, "force": True})
    assert config_hash(a) != config_hash({**a, "task": {"lr": 2}})


def test_store_writes_atomically_and_skips_foreign_files_with_a_warning(tmp_path):
    store = ResultStore(str(tmp_path))
    row = _row("bilinear", "voc", 50.0, 90.0)
    store.write(row)
    (tmp_path / "rows" / ".partial.json.123.tmp").write_text("{")
    (tmp_path / "rows" / "broken.json").write_text("{not json")
    (tmp_path / "rows" / "list.json").write_text("[1, 2]")
    (tmp_path / "rows" / "future.json").write_text(json.dumps({**row, "schema": SCHEMA_VERSION + 1}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.rows() == [json.loads(json.dumps(row))]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and any("broken.json" in m for m in messages) and any("newer upbench" in m for m in messages)
    assert not list((tmp_path / "rows").glob(f".{row['config_hash']}*"))


def test_rows_are_strict_json_and_a_non_finite_metric_is_an_error(tmp_path):
    from upbench.errors import UpbenchError

    with pytest.raises(UpbenchError, match="miou is not a finite number"):
        _row("bilinear", "voc", float("nan"), 90.0)
    bad = _row("bilinear", "voc", 1.0, 90.0)
    bad["metrics"]["acc"] = float("inf")
    with pytest.raises(ValueError):
        ResultStore(str(tmp_path)).write(bad)
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.tmp"))


def test_load_gives_a_flat_frame(tmp_path):
    store = ResultStore(str(tmp_path))
    for r in (_row("bilinear", "voc", 50.0, 90.0), _row("uplift", "voc", 55.0, 91.0, params=10)):
        store.write(r)
    df = load(str(tmp_path))
    assert df.shape[0] == 2
    assert {"method", "backbone", "dataset", "task", "protocol", "metric.miou", "metric.acc", "timing.upsampler_ms",
            "config_hash", "params"} <= set(df.columns)
    assert sorted(df["method"]) == ["bilinear", "uplift"] and df["protocol"].nunique() == 1


def test_table1_layout_ranks_and_formats():
    rows = [_row("nearest", "voc", 40.0, 80.0, 0.5), _row("bilinear", "voc", 45.0, 85.0, 1.0),
            _row("uplift", "voc", 50.0, 84.0, 9.0, params=789521), _row("bilinear", "ade20k", 30.0, 70.0),
            _row("bilinear", "voc", 47.0, 85.0, seed=1)]
    tables = _seg(rows)
    assert len(tables) == 1
    t = tables[0]
    assert t.title == "Segmentation linear probes - backbone demo, lr_schedule per_epoch"
    assert [label for label, _ in t.rows] == ["nearest", "bilinear", "uplift"]
    assert [c for c in t.columns if c[0] == "VOC"] == [("VOC", "mIoU"), ("VOC", "Acc")]
    cells = dict(t.rows)
    assert cells["bilinear"][("VOC", "mIoU")] == 46.0          # two seeds averaged
    assert cells["uplift"][("", "Params (M)")] == 0.789521
    md = report.to_markdown(tables)
    assert "| uplift | 0.79 | 9.0 | **50.00** | _84.00_ | – | – | random init |" in md
    assert "**85.00**" in md and "<u>" not in md   # bilinear best VOC Acc; no HTML in terminal Markdown
    tex = report.to_latex(tables)
    assert r"\toprule" in tex and r"\textbf{50.00}" in tex and r"\underline{46.00}" in tex
    csv = report.to_csv(tables)
    assert "VOC/mIoU" in csv.splitlines()[0]
    assert list(t.frame().columns[:3]) == [("", "Params (M)"), ("", "Time (ms)"), ("VOC", "mIoU")]


def _header_spans(tex):
    """(label, first column, last column) of every \\multicolumn in the group header row, and the sub-header."""
    lines = tex.splitlines()
    top = lines[lines.index(r"\toprule") + 1]
    spans, col = [], 1
    for cell in re.sub(r"\s*\\\\\s*$", "", top).split("&"):
        m = re.fullmatch(r"\s*\\multicolumn\{(\d+)\}\{c\}\{(.*)\}\s*", cell)
        n, label = (int(m.group(1)), m.group(2)) if m else (1, cell.strip())
        spans.append((label, col, col + n - 1))
        col += n
    sub = next(line for line in lines if line.startswith("Upsampler &"))
    return spans, [c.strip() for c in re.sub(r"\s*\\\\\s*$", "", sub).split("&")]


@pytest.mark.parametrize("datasets", [["voc"], ["voc", "ade20k"], ["cocostuff", "voc", "ade20k", "cityscapes"]])
@pytest.mark.parametrize("paper", [False, True])
def test_latex_group_headers_span_exactly_their_dataset(datasets, paper):
    rows = [_row(up, d, 40.0 + i, 80.0 - i, backbone="dinov2_s14", params=p)
            for d in datasets for i, (up, p) in enumerate((("bilinear", 0), ("uplift", 10)))]
    tex = report.to_latex(_seg(rows, paper=paper))
    spans, sub = _header_spans(tex)
    labels = {"voc": "VOC", "ade20k": "ADE20K", "cocostuff": "COCO", "cityscapes": "Cityscapes"}
    for d in datasets:
        (label, a, b), = [s for s in spans if s[0] == labels[d]]
        assert sub[a - 1:b] == ["mIoU", "Acc"], (label, sub)
        assert rf"\cmidrule(lr){{{a}-{b}}}" in tex
    assert sub[-1] == "Weights" and [s for s in spans if s[0] and s[2] == len(sub)] == []
    if paper:   # published rows below their own rule, never ranked
        body = tex[tex.index(r"\midrule"):]
        assert body.count(r"\midrule") == 2 and r"\textbf{85.21}" not in tex


def test_paper_rows_are_reference_only():
    rows = [_row("bilinear", "voc", 10.0, 20.0, backbone="dinov2_s14"), _row("uplift", "voc", 12.0, 21.0,
                                                                          backbone="dinov2_s14")]
    t = _seg(rows, paper=True)[0]
    labels = [label for label, _ in t.rows]
    assert "UPLiFT (paper)" in labels and t.reference_rows == 9
    paper = dict(t.rows)["UPLiFT (paper)"]
    assert paper[("VOC", "mIoU")] == 85.21
    md = report.to_markdown([t])
    assert "**12.00**" in md and "**85.21**" not in md  # published rows are not ranked


def test_render_orders_tasks_and_html_has_every_table():
    rows = [_row("bilinear", "voc", 10.0, 20.0), _row("bilinear", "demo", 1.0, 2.0, task="recon")]
    rows[1]["metrics"] = {"mse": 0.5, "cosine": 0.9}
    md = report.render(rows)
    assert md.index("Segmentation linear probes") < md.index("Feature reconstruction")
    html = report.render(rows, "html")
    assert html.count("<table>") == 2 and "Feature reconstruction" in html


def test_missing_values_print_as_dashes_not_nan():
    """A column that is missing in some rows (weights, notes) becomes NaN in the frame; tables show it as missing."""
    rows = [_row("bilinear", "voc", 10.0, 20.0), _row("uplift", "voc", 12.0, 21.0, params=5)]
    rows[1]["config"]["upsampler"]["weights"] = "demo"
    skipped = build_row({**rows[0]["config"], "upsampler": {"name": "uplift_vae"}}, "x", "skipped", note="not run: x")
    md = report.render(rows + [skipped])
    assert "nan" not in md
    assert "| bilinear | – |" in md and "| demo |" in md and "not run: x" in md


def test_different_experiments_never_share_a_cell():
    """Rows that differ in a setting that changes the numbers (probe lr, image size) land in separate tables named by
    that setting; an upsampler run with two setups gives two rows; seeds of one experiment give mean ± std (n)."""
    def row(up, lr=5e-4, size=448, seed=0, miou=50.0, kwargs=None, ms=1.0):
        r = _row(up, "voc", miou, 90.0, ms=ms, seed=seed)
        r["config"]["task"]["probe"]["lr"] = lr
        r["config"]["dataset"]["img_size"] = size
        if kwargs:
            r["config"]["upsampler"]["kwargs"] = kwargs
        r["config_hash"] = config_hash(r["config"])
        return r

    rows = [row("bilinear", miou=45.61), row("bilinear", lr=5e-3, miou=22.47),
            row("bilinear", size=224, miou=30.0, ms=0.2), row("uplift", miou=50.0, kwargs={"compute_dtype": None}),
            row("uplift", miou=49.0, kwargs={"compute_dtype": "bfloat16"}),
            row("nearest", seed=0, miou=40.0), row("nearest", seed=1, miou=42.0), row("nearest", seed=2, miou=44.0)]
    tables = _seg(rows)
    titles = [t.title for t in tables]
    assert len(tables) == 3, titles
    assert all("task.probe.lr" in t or "dataset.img_size" in t for t in titles)
    cells = {t.title: dict(t.rows) for t in tables}
    values = sorted(c[("VOC", "mIoU")] for table in cells.values() for name, c in table.items() if name == "bilinear")
    assert values == [22.47, 30.0, 45.61]                                  # never averaged into 34.04
    main = next(t for t in tables if "nearest" in dict(t.rows))
    labels = [label for label, _ in main.rows]
    assert "uplift (kwargs.compute_dtype=bfloat16)" in labels and "uplift (kwargs.compute_dtype=null)" in labels
    md = report.to_markdown([main])
    assert "42.00 ± 2.00 (3)" in md and "mean ± standard deviation over n runs" in md
    assert any("split by" in n for t in tables for n in t.notes)
    tex = report.to_latex([main])
    assert r"42.00$\pm$2.00 (3)" in tex


def test_latex_minus_signs_wide_tables_and_markdown_separates_published_rows():
    rows = [_row(up, d, 40.0, 80.0, backbone="dinov2_s14") for up in ("bilinear", "uplift")
            for d in ("cocostuff", "voc", "ade20k", "cityscapes")]
    rows[0]["metrics"]["miou"] = -1.5
    tables = _seg(rows, paper=True)
    tex = report.to_latex(tables)
    assert "$-$1.50" in tex and r"\resizebox{\linewidth}{!}{%" in tex
    assert r"\caption{" in tex and r"\label{tab:" in tex
    md = report.to_markdown(tables)
    lines = md.splitlines()
    sep = next(i for i, line in enumerate(lines) if line.startswith("| *published* |"))
    assert lines[sep + 1].startswith("| Nearest (paper)") and lines[sep - 1].startswith("| uplift |")


def test_published_rows_are_ranked_only_when_asked():
    rows = [_row("bilinear", "voc", 10.0, 20.0, backbone="dinov2_s14"), _row("uplift", "voc", 12.0, 21.0,
                                                                          backbone="dinov2_s14")]
    asked = report.render(rows, "markdown", paper=True, rank_paper=True)
    assert "**85.21**" in asked and "**12.00**" not in asked
