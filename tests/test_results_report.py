import json

from upbench import report
from upbench.results import ResultStore, config_hash


def _row(up, ds, miou, acc, ms=1.0, params=0, backbone="demo", sched="per_epoch", seed=0):
    cfg = {"task": {"name": "seg", "probe": {"lr_schedule": sched}}, "upsampler": {"name": up, "weights": None},
           "backbone": {"name": backbone}, "dataset": {"name": ds}, "seed": seed}
    return {"config_hash": config_hash(cfg), "task": "seg", "upsampler": up, "backbone": backbone, "dataset": ds,
            "status": "ok", "seed": seed, "params": {"upsampler": params}, "metrics": {"miou": miou, "acc": acc},
            "timing": {"upsampler_ms": ms}, "config": cfg}


def test_hash_ignores_paths_and_force_but_not_settings():
    a = {"seed": 0, "paths": {"results": "x"}, "force": False, "task": {"lr": 1}}
    assert config_hash(a) == config_hash({**a, "paths": {"results": "y"}, "force": True})
    assert config_hash(a) != config_hash({**a, "task": {"lr": 2}})


def test_store_writes_atomically_and_ignores_stray_files(tmp_path):
    store = ResultStore(str(tmp_path))
    row = _row("bilinear", "voc", 50.0, 90.0)
    store.write(row)
    (tmp_path / "rows" / ".partial.json.123.tmp").write_text("{")
    (tmp_path / "rows" / "broken.json").write_text("{not json")
    assert store.rows() == [json.loads(json.dumps(row))]
    assert not list((tmp_path / "rows").glob(f".{row['config_hash']}*"))


def test_table1_layout_ranks_and_formats():
    rows = [_row("nearest", "voc", 40.0, 80.0, 0.5), _row("bilinear", "voc", 45.0, 85.0, 1.0),
            _row("uplift", "voc", 50.0, 84.0, 9.0, params=789521), _row("bilinear", "ade20k", 30.0, 70.0),
            _row("bilinear", "voc", 47.0, 85.0, seed=1)]
    tables = report.seg_tables(rows)
    assert len(tables) == 1
    t = tables[0]
    assert [label for label, _ in t.rows] == ["nearest", "bilinear", "uplift"]
    assert [c for c in t.columns if c[0] == "VOC"] == [("VOC", "mIoU"), ("VOC", "Acc")]
    cells = dict(t.rows)
    assert cells["bilinear"][("VOC", "mIoU")] == 46.0          # two seeds averaged
    assert cells["uplift"][("", "Params (M)")] == 0.789521
    md = report.to_markdown(tables)
    assert "| uplift | 0.79 | 9.0 | **50.00** | <u>84.00</u> | – | – | random init |" in md
    assert "**85.00**" in md   # bilinear best VOC Acc
    tex = report.to_latex(tables)
    assert r"\toprule" in tex and r"\textbf{50.00}" in tex and r"\underline{46.00}" in tex
    assert r"\multicolumn{2}{c}{VOC}" in tex
    csv = report.to_csv(tables)
    assert "VOC/mIoU" in csv.splitlines()[0]


def test_paper_rows_are_reference_only():
    rows = [_row("bilinear", "voc", 10.0, 20.0, backbone="dinov2_s14"), _row("uplift", "voc", 12.0, 21.0,
                                                                          backbone="dinov2_s14")]
    t = report.seg_tables(rows, paper=True)[0]
    labels = [label for label, _ in t.rows]
    assert "UPLiFT (paper)" in labels and t.reference_rows == 9
    paper = dict(t.rows)["UPLiFT (paper)"]
    assert paper[("VOC", "mIoU")] == 85.21
    md = report.to_markdown([t])
    assert "**12.00**" in md and "**85.21**" not in md  # published rows are not ranked
