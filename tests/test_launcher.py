"""Jobs without a scheduler: the local submitit launcher (skip finished combinations, job records, failures with
their logs, `upbench status`), resumable probes, a SIGKILLed multirun that a re-run completes without duplicates,
and concurrent writers of one results folder."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from upbench import jobs
from upbench.results import ResultStore

pytest.importorskip("submitit", reason="the cluster launchers need the optional package submitit")

# a seg probe on the embedded demo set that takes a few seconds per job
SEG = ["task=seg", "backbone=demo", "dataset=demo", "dataset.num_images=4", "dataset.limit_val=2",
       "dataset.img_size=64", "threads=1"]


def _env(results):
    return {**os.environ, "UPBENCH_RESULTS": str(results), "HF_HUB_OFFLINE": "1"}


def upbench(results, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "upbench.cli", *args], capture_output=True, text=True,
                          env=_env(results), cwd=results.parent, timeout=timeout)


def _rows(results):
    return {p.name: json.loads(p.read_text()) for p in (results / "rows").glob("*.json")}


def test_local_launcher_skips_finished_records_jobs_and_lists_failures(tmp_path):
    results = tmp_path / "results"
    first = upbench(results, "run", *SEG, "upsampler=bilinear", "task.probe.epochs=2", "hydra/launcher=local")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_rows(results)) == 1
    status = upbench(results, "status")
    assert status.returncode == 0 and "1 finished" in status.stdout, status.stdout
    # bilinear is done: only the new combination is submitted; featup's default weights cannot be downloaded
    # offline, so that job fails and is listed with its log, and the command exits 1
    again = upbench(results, "run", *SEG, "upsampler=bilinear,featup", "task.probe.epochs=2", "hydra/launcher=local")
    assert again.returncode == 1
    out = again.stdout + again.stderr
    assert "1 of 2 jobs submitted" in out and out.count("already finished") == 1
    assert "1 job(s) failed" in again.stderr and "could not download featup weights" in again.stderr
    st = [json.loads(line) for line in upbench(results, "status", "--json").stdout.splitlines()]
    assert [j["state"] for j in st] == ["finished", "failed"]
    failed = st[1]
    assert failed["log"].endswith("_log.err") and Path(failed["log"]).is_file()
    assert "could not download featup weights" in failed["detail"]
    assert "could not download featup weights" in Path(failed["log"]).read_text()
    assert len(_rows(results)) == 1
    listing = upbench(results, "status", "--sweep", "all").stdout
    assert listing.count("sweep ") == 2 and "log:" in listing


def test_status_and_launcher_errors_are_one_line(cli):
    none = cli(["status"])   # nothing submitted yet is a state, not an error
    assert none.returncode == 0 and "no submitted sweeps" in none.stdout and not none.stderr
    bad = cli(["run", *SEG, "cluster=nosuch"])
    assert bad.returncode == 2 and "unknown cluster preset 'nosuch'" in bad.stderr and "local" in bad.stderr
    bad = cli(["run", *SEG, "hydra/launcher=pbs"])
    assert bad.returncode == 2 and "unknown launcher 'pbs'" in bad.stderr


def test_cluster_presets_compose_into_the_slurm_launcher():
    from upbench.cli import compose, config_options

    assert {"local", "a100", "cpu"} <= set(config_options("cluster"))
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="upbench.configs", version_base=None):
        cfg = hydra_compose("config", ["hydra/launcher=slurm", "cluster=a100", "hydra.launcher.timeout_min=30"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("UpbenchSlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.constraint, launcher.timeout_min) == \
        ("gpu", 1, "a100", 30)
    assert "cluster" not in compose(["task=seg"])   # presets only configure the launcher


def _probe(tmp_path, name, *extra):
    from upbench.cli import compose
    from upbench.runner import run_job, to_container

    cfg = to_container(compose([*SEG, "upsampler=bilinear", f"paths.results={tmp_path / name}", *extra]))
    return run_job(cfg, log=lambda *_: None)


def test_probe_resumes_from_its_epoch_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    """Interrupt a probe after its third epoch (as a requeue would), run it again: it resumes from the checkpoint
    and ends exactly where an uninterrupted run ends; the checkpoint is removed once the row is written."""
    import upbench.tasks._probe as common

    full = _probe(tmp_path, "full", "task.probe.epochs=6")
    real_save = common._save_probe_state

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 3:
            raise KeyboardInterrupt   # stands in for the preemption signal

    monkeypatch.setattr(common, "_save_probe_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _probe(tmp_path, "cut", "task.probe.epochs=6")
    monkeypatch.setattr(common, "_save_probe_state", real_save)
    assert len(list((tmp_path / "cut" / "checkpoints").glob("*.pt"))) == 1
    logs = []
    from upbench.cli import compose
    from upbench.runner import run_job, to_container

    resumed = run_job(to_container(compose([*SEG, "upsampler=bilinear", f"paths.results={tmp_path / 'cut'}",
                                            "task.probe.epochs=6"])), log=logs.append)
    assert any("resumed from" in str(line) and "after epoch 3/6" in str(line) for line in logs)
    assert resumed["metrics"] == full["metrics"]
    assert not list((tmp_path / "cut" / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_sigkilled_multirun_rerun_keeps_finished_rows_and_adds_no_duplicates(tmp_path):
    """A 3-point sweep (one process, jobs one after another) is SIGKILLed after its first row; the same command
    run again keeps that row untouched, computes the other two, and leaves exactly three rows."""
    results = tmp_path / "results"
    args = [sys.executable, "-m", "upbench.cli", "run", "-m", *SEG, "upsampler=bilinear,nearest,lift_2x",
            "task.probe.epochs=150"]
    proc = subprocess.Popen(args, env=_env(results), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_rows(results) if (results / "rows").is_dir() else {}) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows(results)
    assert len(before) == 1, "the sweep was not killed mid-way"
    rerun = subprocess.run(args, env=_env(results), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _rows(results)
    assert len(after) == 3 and sorted(r["upsampler"] for r in after.values()) == ["bilinear", "lift_2x", "nearest"]
    for name, row in before.items():
        assert after[name] == row   # kept as it was, not recomputed
    assert "[skip]" in rerun.stdout + rerun.stderr
    assert not [p for p in (results / "rows").iterdir() if not p.name.endswith(".json")]


def _writer(root, worker, n):
    store = ResultStore(root)
    for i in range(n):
        store.write({"config_hash": f"w{worker}-{i}", "task": "seg", "status": "ok", "worker": worker,
                     "payload": "x" * 20000})
        store.write({"config_hash": "shared", "task": "seg", "status": "ok", "worker": worker, "payload": "y" * 20000})


def test_concurrent_writers_lose_and_corrupt_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = ResultStore(str(tmp_path)).rows()
    assert len(rows) == 4 * 25 + 1
    assert {r["config_hash"] for r in rows} == {f"w{w}-{i}" for w in range(4) for i in range(25)} | {"shared"}
    assert all(len(r["payload"]) == 20000 for r in rows)   # every file is one complete row
    assert not [p for p in (tmp_path / "rows").iterdir() if not p.name.endswith(".json")]


def test_job_state_from_the_evidence(tmp_path):
    row = tmp_path / "row.json"
    rec = {"submitted": True, "executor": "local", "job_id": "999999999", "result": str(row), "stderr": "e.log"}
    assert jobs.job_state(rec)["state"] == "lost"
    row.write_text("{}")
    assert jobs.job_state(rec)["state"] == "finished"
    assert jobs.job_state({"submitted": False})["state"] == "finished"
    assert jobs.SLURM_STATES["CANCELLED"] == "cancelled" and jobs.SLURM_STATES["TIMEOUT"] == "failed"


@pytest.mark.slow
def test_train_and_sweep_go_through_the_same_launcher(tmp_path):
    """`upbench train` and `upbench sweep` submitted with hydra/launcher=local: each is a job with a record that
    `upbench status` reads; a finished training is not submitted again."""
    results = tmp_path / "results"
    train = ["train", "backbone=demo", "data.root=builtin:skimage", "data.img_size=64", "data.limit=2",
             "train.batch_size=2", "train.depths=[1]", "threads=1", f"train.out_dir={tmp_path / 'w'}",
             "hydra/launcher=local"]
    first = upbench(results, *train)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (tmp_path / "w" / "uplift_demo.safetensors").is_file()
    st = [json.loads(line) for line in upbench(results, "status", "--json").stdout.splitlines()]
    assert [j["state"] for j in st] == ["finished"] and st[0]["config_name"] == "train"
    again = upbench(results, *train)
    assert again.returncode == 0 and "0 of 1 jobs submitted" in again.stdout + again.stderr
    sweep = upbench(results, "sweep", "scaling", "upsamplers=[bilinear]", "sizes=[64]", "warmup=1", "runs=2",
                    "hydra/launcher=local")
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    st = [json.loads(line) for line in upbench(results, "status", "--json").stdout.splitlines()]
    assert [j["state"] for j in st] == ["finished"] and st[0]["config_name"] == "sweep/scaling"
    report = upbench(results, "report", "--scaling")
    assert report.returncode == 0 and "bilinear" in report.stdout
