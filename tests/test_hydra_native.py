"""upbench as a Hydra application: jobs return their primary metric (so sweepers work), every verb takes Hydra's
flags, per-job log files hold the job's output, the app is called upbench, and shell completion completes verbs,
config groups and options in a real bash."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEMO = ["backbone=demo", "dataset=demo", "dataset.img_size=64", "dataset.num_images=4", "task.probe.epochs=2",
        "upsampler=bilinear"]


def _upbench(args, results, cwd, timeout=600):
    env = {**os.environ, "UPBENCH_RESULTS": str(results), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "upbench", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_optuna_sweeps_the_probe_lr_and_picks_the_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper (the dev extra)")
    results = tmp_path / "results"
    out = _upbench(["run", "-m", "hydra/sweeper=optuna", "task.probe.lr=tag(log, interval(1e-4, 1e-1))",
                    "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
                    *DEMO], results, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    found = list((results / ".hydra" / "multirun").rglob("optimization_results.yaml"))
    assert len(found) == 1, found
    best = yaml.safe_load(found[0].read_text())
    rows = [json.loads(p.read_text()) for p in (results / "rows").glob("*.json")]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    by_lr = {r["config"]["task"]["probe"]["lr"]: r["metrics"]["miou"] for r in rows}
    assert best["best_value"] == pytest.approx(max(by_lr.values()))          # the primary metric: mIoU
    assert by_lr[best["best_params"]["task.probe.lr"]] == pytest.approx(best["best_value"])
    logs = list((results / ".hydra" / "multirun").rglob("upbench.log"))     # the job's output, per job
    assert len(logs) == 3 and all("[done] task=seg" in p.read_text() for p in logs)


def test_a_job_returns_its_tasks_primary_metric(cli, tmp_path):
    from upbench.runner import primary_metric

    row = {"task": "depth", "metrics": {"d1": 71.5, "rmse": 0.4}}
    assert primary_metric(row) == 71.5
    assert primary_metric({"task": "seg", "metrics": {"miou": 40.0, "acc": 80.0}}) == 40.0
    assert primary_metric({"task": "seg", "metrics": {}}) is None


@pytest.mark.parametrize("verb", [["run"], ["train"], ["sweep", "scaling"]])
def test_every_hydra_verb_takes_hydras_flags(cli, verb, tmp_path):
    job = cli([*verb, "--cfg", "job"])
    assert job.returncode == 0 and "backbone:" in job.stdout, job.stderr
    assert "hydra:" not in job.stdout
    hyd = cli([*verb, "--cfg", "hydra"])
    assert hyd.returncode == 0 and "name: upbench" in hyd.stdout
    info = cli([*verb, "--info", "searchpath"])
    assert info.returncode == 0 and "pkg://upbench.configs" in info.stdout
    resolved = cli([*verb, "--cfg", "job", "--resolve"])
    assert resolved.returncode == 0 and "${" not in resolved.stdout
    helped = cli([*verb, "--help"])
    assert helped.returncode == 0 and "upbench is powered by Hydra" in helped.stdout
    assert not (tmp_path / "results").exists()   # printing writes nothing


def test_version_and_help_are_for_users(cli):
    from upbench import __version__

    v = cli(["--version"])
    assert v.returncode == 0 and v.stdout.strip() == f"upbench {__version__}"
    h = cli(["--help"])
    assert h.returncode == 0 and h.stdout.startswith("usage: upbench <command>")
    for verb in ("run", "train", "sweep", "demo", "report", "viz", "status", "list"):
        assert f"\n  {verb} " in h.stdout


def test_help_does_not_import_torch():
    code = "import sys, upbench.cli as c; c.main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_verbs_groups_options_and_keys(tmp_path):
    script = subprocess.run([sys.executable, "-m", "upbench", "--shell-completion", "install=bash"],
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    path = tmp_path / "upbench-completion.bash"
    path.write_text(script.stdout)
    cases = {"upbench ru": "run", "upbench run task=se": "seg", "upbench run upsampler=bil": "bilinear",
             "upbench run upsampler=bilinear,nea": "bilinear,nearest", "upbench run task.probe.lr_": "task.probe.lr_schedule=",
             "upbench run protocol=uplift_table": "uplift_table1 uplift_table2 uplift_table3 uplift_table4 uplift_table8",
             "upbench sweep sc": "scaling", "upbench viz pc": "pca", "upbench report --la": "--latex",
             "upbench run hydra/launcher=sl": "slurm", "upbench run --cfg j": "job"}
    calls = "\n".join(f't "{line}"' for line in cases)
    body = f"""source {path}
t() {{ COMP_LINE="$1"; COMP_POINT=${{#1}}; read -ra COMP_WORDS <<< "$1"; COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
     COMPREPLY=(); _upbench_complete; echo "${{COMPREPLY[*]}}"; }}
{calls}
"""
    out = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = out.stdout.splitlines()
    assert got == list(cases.values()), list(zip(cases, got))
    assert "complete -F _upbench_complete upbench" in script.stdout


def test_completion_scripts_for_other_shells_and_a_clear_error(cli):
    assert "bashcompinit" in cli(["--shell-completion", "install=zsh"]).stdout
    assert "commandline -cp" in cli(["--shell-completion", "install=fish"]).stdout
    bad = cli(["--shell-completion", "install=tcsh"])
    assert bad.returncode == 2 and "bash, zsh, fish" in bad.stderr


def test_per_job_log_of_a_single_run_holds_its_output(tmp_path):
    results = tmp_path / "results"
    out = _upbench(["run", *DEMO, "task.probe.epochs=1"], results, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[done] task=seg" in out.stdout                      # the console shows the lines as they are
    logs = list((results / ".hydra").rglob("upbench.log"))
    assert len(logs) == 1 and "[done] task=seg" in logs[0].read_text()
    assert "epoch 1/1" in logs[0].read_text()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from upbench import progress

    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.delenv("UPBENCH_PROGRESS", raising=False)
    assert progress.enabled() and not progress.bar(total=3).disable
    monkeypatch.setenv("UPBENCH_PROGRESS", "0")
    assert progress.bar(total=3).disable
    monkeypatch.setattr(sys, "stderr", Path(os.devnull).open("w"))
    monkeypatch.delenv("UPBENCH_PROGRESS")
    assert progress.bar(total=3).disable
