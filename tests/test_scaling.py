"""upbench sweep scaling: the worker's measurements and limits, the orchestration (reuse, stop after a failure),
the report's slopes / reach / tables / figure, and the CLI (including the --quick grid that CI runs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upbench import report, scaling
from upbench.cli import compose
from upbench.results import ResultStore
from upbench.runner import to_container

UPBENCH = [sys.executable, "-m", "upbench.cli"]


def sweep_cfg(tmp_path, *overrides):
    return to_container(compose([f"paths.results={tmp_path / 'results'}", *overrides], config_name="sweep/scaling"))


def run_cli(args, tmp_path, timeout=600):
    env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(UPBENCH + args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------------ pure report parts
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_fit_slope_recovers_power_laws(power):
    xs = [196, 441, 784, 1521, 2601]
    assert report.fit_slope(xs, [3.0 * x ** power for x in xs]) == pytest.approx(power, abs=1e-9)
    assert report.fit_slope([100], [5.0]) is None


def fake_row(up, tokens, status="ok", ms=None, mb=None, family="local", iqr=0.5, load=None, times=None):
    return {"task": "scaling", "upsampler": up, "backbone": "bb", "status": status,
            "data": {"tokens": tokens, "size": int(tokens ** 0.5) * 16, "gflops": 1.0, "family": family},
            "params": {"upsampler": 1000},
            "timing": {"median_ms": ms, "iqr_ms": iqr, "runs": 10 if status == "ok" else 1,
                       "times_ms": times or ([ms * 0.9, ms, ms * 1.1] if ms else []), "load_start": load,
                       "load_end": load, "cpu_count": 2},
            "memory": {"peak_mb": mb, "limit_gb": 8.0},
            "config": {"device": {"type": "cpu", "name": "x"}, "dtype": "float32", "cpu_threads": 2,
                       "memory_limit_gb": 8.0}}


def test_summary_slopes_reach_and_stop_reason():
    rows = [fake_row("local_up", n, ms=n * 0.1, mb=n * 2.0) for n in (100, 400, 1600)]
    rows += [fake_row("xattn", n, ms=(n / 100) ** 2, mb=n ** 2 / 1000, family="cross-attention")
             for n in (25, 100, 400)] + [fake_row("xattn", 1600, status="oom", family="cross-attention")]
    summ = report.scaling_summary(rows)
    assert summ["local_up"]["time_slope"] == pytest.approx(1.0)
    assert summ["local_up"]["memory_slope"] == pytest.approx(1.0)
    assert summ["xattn"]["time_slope"] == pytest.approx(2.0)
    assert summ["local_up"]["max_tokens"] == 1600 and summ["local_up"]["stopped"] == "–"
    assert summ["xattn"]["max_tokens"] == 400 and summ["xattn"]["stopped"] == "OOM at 1600"
    assert summ["local_up"]["time_slope_top"] is None     # 3 points: a top-3 slope would only repeat the slope
    tables = report.scaling_tables(rows)
    md = report.to_markdown(tables)
    assert "| Tokens (px) | local_up | xattn |" in md                     # rows are token counts, not upsamplers
    assert "| 1600 (640 px) | 160.0 (0.5) | OOM |" in md
    assert "Time slope (top 3)" not in md
    assert "reach: local_up at least 4.00x the tokens of the best cross-attention method (xattn: 400, OOM at 1600)" in md
    tex = report.to_latex(tables)
    assert r"\toprule" in tex and r"\multicolumn" not in tex      # no empty group-header row


def test_slopes_need_three_trusted_points_and_noisy_or_loaded_points_are_flagged():
    rows = [fake_row("u", 100, ms=1.0, mb=10.0), fake_row("u", 400, ms=4.0, mb=40.0),
            fake_row("u", 1600, ms=999.0, mb=160.0, iqr=900.0),                  # IQR > median/4: noisy
            fake_row("v", 100, ms=1.0, mb=10.0), fake_row("v", 400, ms=4.0, mb=40.0, load=5.0)]   # 2 CPUs, load 5
    assert report.scaling.point_flags(rows[2]) == ["noisy"] and report.scaling.point_flags(rows[4]) == ["loaded"]
    summ = report.scaling_summary(rows)
    assert summ["u"]["time_slope_single"] and summ["u"]["time_slope"] is not None   # fallback, marked *
    assert summ["v"]["time_slope"] is None and summ["v"]["memory_slope"] is None     # two points: no slope
    md = report.to_markdown(report.scaling_tables(rows))
    assert "999.0 (900.0)†" in md and "4.0 (0.5)‡" in md and "† noisy" in md and "‡ loaded" in md
    csv = report.render(rows, "csv", scaling=True).splitlines()
    header = csv[0].split(",")
    assert header[:3] == ["backbone", "device", "dtype"] and "median_ms" in header and "peak_mb" in header
    assert len(csv) == 1 + len(rows)
    noisy = next(line for line in csv[1:] if ",1600," in line)
    assert noisy.split(",")[header.index("flags")] == "noisy"
    assert noisy.split(",")[header.index("median_ms")] == "999.0"   # one value per cell


def test_time_limited_point_counts_for_memory_not_time():
    rows = [fake_row("u", 25, ms=0.25, mb=2.5, iqr=0.01), fake_row("u", 100, ms=1.0, mb=10.0, iqr=0.01),
            fake_row("u", 400, ms=4.0, mb=40.0, iqr=0.01), fake_row("u", 1600, status="time_limit", ms=999.0, mb=160.0)]
    summ = report.scaling_summary(rows)
    s = summ["u"]
    assert "no cross-attention method failed" not in " ".join(report.scaling._reach_notes(summ))  # no cross-attention
    assert s["time_slope"] == pytest.approx(1.0) and not s["time_slope_single"]  # the single forward is not fitted
    assert s["memory_slope"] == pytest.approx(1.0)
    assert s["max_tokens"] == 1600 and s["stopped"] == "time limit"
    assert "999.0*" in report.to_markdown(report.scaling_tables(rows))


def test_figure_is_written(tmp_path):
    from upbench.viz import rows as figures

    rows = [fake_row("a", n, ms=n * 0.1, mb=n * 2.0) for n in (100, 400)] + [
        fake_row("b", 100, ms=1, mb=3, family="cross-attention"), fake_row("b", 400, status="oom", family="cross-attention")]
    paths = figures.scaling(rows, tmp_path)
    png = next(p for p in paths if p.endswith(".png"))
    assert Path(png).stat().st_size > 10_000 and any(p.endswith(".pdf") for p in paths)
    assert figures.scaling([], tmp_path / "none") == []


# ------------------------------------------------------------------------------------------------ the worker
def test_point_measures_time_memory_and_flops(tmp_path):
    s = scaling.resolve(sweep_cfg(tmp_path, "sizes=[128]", "warmup=3", "runs=4", "upsamplers=[bilinear]"))
    pcfg = scaling.point_config(s, "bilinear", 128, scaling.device_label(s["device"]))
    row = scaling.measure_point(pcfg, "k", "interpolation", s)
    assert row["status"] == "ok", row["error"]
    assert row["timing"]["runs"] == 4 and row["timing"]["warmup"] == 3 and len(row["timing"]["times_ms"]) == 4
    assert row["timing"]["iqr_ms"] >= 0 and row["timing"]["median_ms"] > 0
    out_mb = 384 * 128 * 128 * 4 / 2 ** 20  # the output tensor alone: 24 MB
    assert out_mb * 0.9 < row["memory"]["peak_mb"] < out_mb * 4
    assert row["data"]["tokens"] == 64 and row["device"]["threads"] == s["threads"]


def test_memory_cap_gives_oom_row(tmp_path):
    # a 512 px pixel-dense output of 384 channels is 384 MB, far over a 64 MB cap
    s = scaling.resolve(sweep_cfg(tmp_path, "sizes=[512]", "memory_limit_gb=0.0625", "upsamplers=[bilinear]"))
    pcfg = scaling.point_config(s, "bilinear", 512, scaling.device_label(s["device"]))
    row = scaling.measure_point(pcfg, "k", "interpolation", s)
    assert row["status"] == "oom", row
    assert "allocate" in row["error"].lower() or "memory" in row["error"].lower()


def test_time_limit_measures_once(tmp_path):
    s = scaling.resolve(sweep_cfg(tmp_path, "sizes=[64]", "time_limit_s=0.000001", "upsamplers=[uplift]"))
    pcfg = scaling.point_config(s, "uplift", 64, scaling.device_label(s["device"]))
    row = scaling.measure_point(pcfg, "k", "local", s)
    assert row["status"] == "time_limit" and row["timing"]["runs"] == 1
    assert row["memory"]["peak_mb"] > 0 and row["data"]["gflops"] > 0


def test_worker_crash_is_an_error_row_not_a_crash(tmp_path):
    s = scaling.resolve(sweep_cfg(tmp_path, "sizes=[64]", "upsamplers=[uplift]", "+kwargs.uplift.arch=nonexistent"))
    pcfg = scaling.point_config(s, "uplift", 64, scaling.device_label(s["device"]))
    row = scaling.measure_point(pcfg, "k", "local", s)
    assert row["status"] == "error" and "nonexistent" in row["error"]


def test_forked_workers_report_like_new_processes(tmp_path):
    """On a CPU the points run in children forked from one server process: the same statuses (ok, oom under the cap,
    error from a crash, timeout) and measurements of the same kind as a new process per point."""
    s = scaling.resolve(sweep_cfg(tmp_path, "sizes=[128]", "warmup=1", "runs=2", "upsamplers=[bilinear]"))
    server = scaling.WorkerServer.start(s)
    assert server is not None
    try:
        dev = scaling.device_label(s["device"])
        ok = scaling.measure_point(scaling.point_config(s, "bilinear", 128, dev), "k", "interpolation", s, server)
        assert ok["status"] == "ok" and ok["timing"]["worker"] == "fork" and ok["timing"]["runs"] == 2
        out_mb = 384 * 128 * 128 * 4 / 2 ** 20
        assert out_mb * 0.9 < ok["memory"]["peak_mb"] < out_mb * 4
        capped = dict(s, memory_limit_gb=0.0625)
        oom = scaling.measure_point(scaling.point_config(capped, "bilinear", 512, dev), "k", "interpolation", capped,
                                    server)
        assert oom["status"] == "oom" and oom["timing"]["worker"] == "fork"
        crash = dict(s, kwargs={"uplift": {"arch": "nonexistent"}})
        err = scaling.measure_point(scaling.point_config(crash, "uplift", 64, dev), "k", "local", crash, server)
        assert err["status"] == "error" and "nonexistent" in err["error"]
        slow = dict(s, worker_timeout_s=0.05)
        late = scaling.measure_point(scaling.point_config(slow, "uplift", 128, dev), "k", "local", slow, server)
        assert late["status"] == "timeout"
        # the server survives all of that and still measures
        again = scaling.measure_point(scaling.point_config(s, "bilinear", 128, dev), "k", "interpolation", s, server)
        assert again["status"] == "ok"
    finally:
        server.close()
    assert server.proc.poll() is not None


# ------------------------------------------------------------------------------------------------ orchestration
def test_sweep_reuses_rows_and_stops_after_oom(tmp_path):
    # nearest at 128 px needs 24 MB of output, at 384 px 216 MB: a 96 MB cap stops it at 384, so 512 is not tried
    cfg = sweep_cfg(tmp_path, "sizes=[128,384,512]", "upsamplers=[nearest]", "memory_limit_gb=0.09375",
                    "warmup=1", "runs=2", "plot=false")
    logs = []
    rows = scaling.run_sweep(cfg, log=logs.append)
    assert [r["status"] for r in rows] == ["ok", "oom"]
    assert any("[skip]" in line and "[512]" in line for line in logs)
    stored = ResultStore(str(tmp_path / "results")).rows()
    assert len(stored) == 2
    logs2 = []
    again = scaling.run_sweep(cfg, log=logs2.append)
    assert [r["config_hash"] for r in again] == [r["config_hash"] for r in rows]
    assert sum("[done]" in line for line in logs2) == 2 and not any("[new]" in line for line in logs2)
    assert len(ResultStore(str(tmp_path / "results")).rows()) == 2


def test_unknown_upsampler_and_bad_sizes_are_clear_errors(tmp_path):
    from upbench.errors import UpbenchError

    with pytest.raises(UpbenchError, match="unknown upsampler.*bilnear"):
        scaling.resolve(sweep_cfg(tmp_path, "upsamplers=[bilnear]"))
    with pytest.raises(UpbenchError, match="sizes"):
        scaling.resolve(sweep_cfg(tmp_path, "sizes=[8]"))


def test_bad_axes_passes_and_axis_grids_are_clear_errors(tmp_path):
    from upbench.errors import UpbenchError

    for override, needle in (("axes=[depth]", "axes=.*tokens, ratio, channels"),
                             ("passes=[train]", "passes=.*forward, backward"),
                             ("ratio_axis.factors=[0,2]", "ratio_axis.factors"),
                             ("channel_axis.size=4", "channel_axis.size=4")):
        with pytest.raises(UpbenchError, match=needle):
            scaling.resolve(sweep_cfg(tmp_path, override))


def test_ratio_channel_and_backward_curves(tmp_path):
    """NAF's efficiency curves: the ratio axis keeps the image and the feature grid and grows the output, the channel
    axis grows the feature channels, the backward pass times forward + backward with gradients (more FLOPs and
    memory than the forward); every curve gets its own tables, CSV columns and figure; the tokens-forward curve keeps
    its point keys."""
    cfg = sweep_cfg(tmp_path, "upsamplers=[bilinear,uplift]", "axes=[ratio,channels]", "passes=[forward,backward]",
                    "ratio_axis.size=64", "ratio_axis.factors=[2,8]", "channel_axis.size=32",
                    "channel_axis.values=[8,32]", "warmup=1", "runs=2")
    s = scaling.resolve(cfg)
    assert [(a, p, pts) for a, p, pts in scaling.plan(s)] == [
        ("ratio", "forward", [(64, 4, 8, 384), (64, 4, 32, 384)]),
        ("ratio", "backward", [(64, 4, 8, 384), (64, 4, 32, 384)]),
        ("channels", "forward", [(32, 2, 32, 8), (32, 2, 32, 32)]),
        ("channels", "backward", [(32, 2, 32, 8), (32, 2, 32, 32)])]
    dev = scaling.device_label(s["device"])
    assert "axis" not in scaling.point_config(s, "uplift", 64, dev)   # the default curve's keys are unchanged
    rows = scaling.run_sweep(cfg, log=lambda _m: None)
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    by = {(r["upsampler"], r["data"]["axis"], r["data"]["pass"], r["data"]["x"]): r for r in rows}
    assert by[("uplift", "ratio", "forward", 8)]["data"]["output"] == 32
    assert by[("uplift", "ratio", "forward", 8)]["data"]["pixels"] == 32 * 32
    assert by[("uplift", "channels", "forward", 32)]["params"]["upsampler"] > \
        by[("uplift", "channels", "forward", 8)]["params"]["upsampler"]
    for x in (2, 8):
        fwd, bwd = by[("uplift", "ratio", "forward", x)], by[("uplift", "ratio", "backward", x)]
        assert bwd["data"]["gflops"] > 1.5 * fwd["data"]["gflops"]      # backward ~ 2x the forward's matmuls
    titles = [t.title for t in report.scaling_tables(rows)]
    assert any("forward + backward vs upsampling ratio (64 px image, 4x4 features)" in t for t in titles)
    assert any(t.startswith("Scaling summary (log-log slopes vs channels)") for t in titles)
    csv = report.render(rows, "csv", scaling=True).splitlines()
    header = csv[0].split(",")
    assert {"axis", "pass", "output_px", "ratio", "channels"} <= set(header)
    assert sum(1 for line in csv[1:] if line.split(",")[header.index("pass")] == "backward") == 8

    from upbench.viz import rows as figures

    names = sorted(Path(p).name for p in figures.scaling(rows, tmp_path / "fig") if p.endswith(".png"))
    assert len(names) == 4 and len(set(names)) == 4, names


@pytest.mark.parametrize("args,needle", [
    (["sweep"], "which sweep?"),
    (["sweep", "scalng"], "unknown sweep 'scalng'; sweeps: scaling"),
    (["sweep", "scaling", "--fast"], "unknown option --fast"),
    (["report", "--plot", "x.png"], "--plot needs --scaling"),
])
def test_cli_errors_are_one_line_exit_2(cli, args, needle):
    out = cli(args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_an_error_inside_the_sweep_job_is_one_line_exit_2(tmp_path):
    out = run_cli(["sweep", "scaling", "upsamplers=[bilnear]"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "unknown upsampler(s) bilnear" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_quick_sweep_every_upsampler_and_report(tmp_path):
    """``upbench sweep scaling --quick``: its grid holds every registered feature upsampler at three sizes; each of
    them is measured by the sweep's worker (at the grid's first size), two of them over the whole grid give the table,
    slopes and PNG, then ``upbench report --scaling`` reprints the same summary from the store."""
    from upbench import upsamplers

    names = [n for n in upsamplers.available() if n not in ("uplift_vae", "lowres", "input2x")]
    grid = scaling.resolve(sweep_cfg(tmp_path), quick=True)
    assert sorted(grid["upsamplers"]) == sorted(names)
    assert [(axis, pass_, [pt[0] for pt in pts]) for axis, pass_, pts in scaling.plan(grid)] == \
        [("tokens", "forward", [32, 48, 64])]
    every = run_cli(["sweep", "scaling", "--quick", "sizes=[32]", "plot=false"], tmp_path, timeout=900)
    assert every.returncode == 0, every.stderr[-3000:]
    rows = [r for r in ResultStore(str(tmp_path / "results")).rows() if r["task"] == "scaling"]
    assert {r["upsampler"] for r in rows} == set(names)
    assert all(r["status"] == "ok" for r in rows), [(r["upsampler"], r["status"], r["error"]) for r in rows]
    assert len(rows) == len(names)
    out = run_cli(["sweep", "scaling", "--quick", "upsamplers=[bilinear,uplift]"], tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[done]") == 2 and out.stdout.count("[new]") == 4     # the 32 px points are reused
    rows = [r for r in ResultStore(str(tmp_path / "results")).rows() if r["task"] == "scaling"]
    assert len(rows) == len(names) + 4 and all(r["status"] == "ok" for r in rows)
    assert "Scaling summary" in out.stdout and "Time slope" in out.stdout
    png, = (tmp_path / "results" / "figures").glob("scaling_dinov3_splus16*.png")
    assert png.stat().st_size > 10_000
    rep = run_cli(["report", "--scaling", "--plot", str(tmp_path / "again.png")], tmp_path)
    assert rep.returncode == 0
    def summary_rows(text):   # the slope rows of bilinear and uplift (the report also lists the 32 px-only ones)
        part = text[text.index("### Scaling summary"):]
        return [line for line in part.splitlines() if line.startswith(("| bilinear |", "| uplift |"))]
    assert len(summary_rows(out.stdout)) == 2 and summary_rows(rep.stdout) == summary_rows(out.stdout)
    assert all(f"| {n} |" in rep.stdout for n in names)
    again = run_cli(["sweep", "scaling", "--quick", "upsamplers=[bilinear]"], tmp_path)
    assert again.returncode == 0 and "[done]" in again.stdout and "[new]" not in again.stdout
