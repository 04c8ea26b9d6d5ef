"""The real scheduler: slurm/local-cluster.sh brings up a single-node SLURM on this machine, and multiruns go
through the real sbatch path (hydra/launcher=slurm cluster=local).  Needs root and Debian's apt (the script
exits 3 otherwise, and these tests are skipped with its reason)."""
import json
import subprocess
import time
from pathlib import Path

import pytest

from test_launcher import SEG, _rows, upbench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("submitit", reason="the SLURM launcher needs the optional package submitit")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode == 3:
        pytest.skip(f"no local SLURM on this machine: {(up.stdout + up.stderr).strip().splitlines()[-1]}")
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not was_up:
        down = subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def _status(results, *args):
    out = upbench(results, "status", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _wait_for(results, predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = _status(results)
        if predicate(jobs):
            return jobs
        time.sleep(1)
    raise AssertionError(f"timed out; last status: {jobs}")


@pytest.mark.slow
def test_multirun_through_sbatch_then_report_status_and_cancel(cluster, tmp_path):
    results = tmp_path / "results"
    cmd = ["run", *SEG, "upsampler=bilinear,nearest", "task.probe.epochs=2", "cluster=local"]   # one array, 2 tasks
    first = upbench(results, *cmd)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted as slurm job" in first.stdout + first.stderr
    rows = _rows(results)
    assert sorted(r["upsampler"] for r in rows.values()) == ["bilinear", "nearest"]
    report = upbench(results, "report")
    assert report.returncode == 0
    for name in ("bilinear", "nearest"):
        assert f"| {name} |" in report.stdout
    jobs = _status(results)
    assert [j["state"] for j in jobs] == ["finished"] * 2
    assert all("_" in j["job_id"] for j in jobs)   # one array job, one task per combination

    # an extra, long job, submitted without waiting and cancelled while it runs
    extra = upbench(results, "run", *SEG, "upsampler=bilinear", "task.probe.epochs=100000", "cluster=local",
                    "hydra.launcher.wait=false")
    assert extra.returncode == 0, extra.stderr[-3000:]
    job = _wait_for(results, lambda js: js[0]["state"] == "running")[0]
    subprocess.run(["scancel", job["job_id"]], check=True)
    job = _wait_for(results, lambda js: js[0]["state"] != "running")[0]
    assert job["state"] == "cancelled" and "CANCELLED" in job["detail"] and job["log"]
    assert len(_rows(results)) == 2

    # the same multirun again: everything is finished, nothing is submitted
    again = upbench(results, *cmd)
    assert again.returncode == 0 and "0 of 2 jobs submitted" in again.stdout + again.stderr


@pytest.mark.slow
def test_preempted_probe_is_requeued_and_resumes_to_the_uninterrupted_result(cluster, tmp_path):
    """SIGUSR2 is how SLURM announces preemption: submitit checkpoints (requeues the job), the requeued job's probe
    resumes from its last epoch checkpoint and ends with the same row as a run that was never interrupted."""
    results = tmp_path / "results"
    probe = [*SEG, "upsampler=bilinear", "task.probe.epochs=400"]   # ~7 s of epochs: time to preempt it
    sub = upbench(results, "run", *probe, "cluster=local", "hydra.launcher.wait=false")
    assert sub.returncode == 0, sub.stderr[-3000:]
    job = _wait_for(results, lambda js: js[0]["state"] == "running")[0]
    deadline = time.time() + 120
    while not list((results / "checkpoints").glob("*.pt")) and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    time.sleep(3)
    # SLURM holds a requeued job back for a while; let it start at once
    subprocess.run(["scontrol", "update", f"jobid={job['job_id']}", "StartTime=now"], capture_output=True)
    job = _wait_for(results, lambda js: js[0]["state"] not in ("running", "pending"), timeout=300)[0]
    assert job["state"] == "finished", job
    out = Path(job["stderr"]).with_name(Path(job["stderr"]).name.replace("_log.err", "_log.out")).read_text()
    assert "resumed from" in out
    preempted = next(iter(_rows(results).values()))
    reference = upbench(tmp_path / "reference", "run", *probe)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert next(iter(_rows(tmp_path / "reference").values()))["metrics"] == preempted["metrics"]
