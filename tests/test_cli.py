import os
import subprocess
import sys

import pytest

UPBENCH = [sys.executable, "-m", "upbench.cli"]


def run(args, tmp_path, **env):
    full_env = {**os.environ, "UPBENCH_RESULTS": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(UPBENCH + args, capture_output=True, text=True, cwd=tmp_path, env=full_env, timeout=600)


def test_list_names_every_group(cli):
    out = cli(["list"])
    assert out.returncode == 0
    assert "bilinear" in out.stdout and "demo" in out.stdout and "seg" in out.stdout and "voc" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["run", "upsampler=bilnear"], "unknown upsampler 'bilnear'; available upsamplers:"),
    (["run", "-m", "upsampler=bilinear,foo"], "unknown upsampler 'foo'"),
    (["run", "dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_names_one_line_exit_2(cli, args, needle):
    out = cli(args)
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_missing_dataset_is_one_line_exit_2_and_keeps_results(tmp_path):
    out = run(["run", "backbone=demo", "dataset=voc", "dataset.root=/nonexistent"], tmp_path)
    assert out.returncode == 2
    assert "voc: no images found" in out.stderr and "Traceback" not in out.stderr


def test_bad_override_gives_hydra_error_not_traceback(tmp_path):
    out = run(["run", "task.probe.nonexistent_key=3"], tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "nonexistent_key" in out.stderr


def test_run_and_report_roundtrip(tmp_path):
    args = ["run", "backbone=demo", "dataset=demo", "dataset.img_size=64", "dataset.num_images=4",
            "dataset.limit_val=2", "task.probe.epochs=1"]
    out = run(args + ["-m", "upsampler=bilinear,nearest"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list((tmp_path / "results" / "rows").glob("*.json"))
    assert len(rows) == 2
    rep = run(["report"], tmp_path)
    assert rep.returncode == 0 and "| bilinear |" in rep.stdout and "| nearest |" in rep.stdout
    tex = run(["report", "--latex"], tmp_path)
    assert r"\toprule" in tex.stdout
    csv = run(["report", "--csv", "--results", str(tmp_path / "results")], tmp_path)
    assert csv.stdout.count("\n") == 3


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(monkeypatch, capsys):
    """The CLI asks OpenMP for passive waiting before torch loads it (a spinning thread starves its partner on a
    shared CPU, see benchmarks/loaded_cpu.py); a value the user set is kept."""
    import os

    from upbench import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli.main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    from upbench.results import device_info
    import torch

    assert device_info(torch.device("cpu"))["omp_wait_policy"] == "ACTIVE"
