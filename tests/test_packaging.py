"""upbench installs under one namespace: a wheel holds only ``upbench`` and ``hydra_plugins``; the design card's
folders (upsamplers/, tasks/, configs/, slurm/) install as ``upbench.*``; nothing named ``tasks`` or ``configs`` is
importable after installing it; and an install without the ``slurm`` extra runs jobs and the sweep.

Each environment is a fresh virtual environment whose dependencies come from the test environment's site-packages
*without* submitit and hydra-submitit-launcher (as ``pip install upbench[dev]`` leaves them), commands run from an
unrelated folder."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])
SLURM_EXTRA = ("submitit", "hydra_submitit_launcher", "hydra_plugins")
TINY = ["backbone=demo", "dataset=demo", "dataset.img_size=64", "dataset.num_images=4", "dataset.limit_val=2",
        "task.probe.epochs=1", "threads=1"]

pytestmark = pytest.mark.slow


def _deps_without_slurm(folder: Path) -> Path:
    """A folder of links to every installed package except the slurm extra and upbench itself."""
    folder.mkdir()
    for entry in SITE.iterdir():
        name = entry.name.lower()
        if name.startswith(SLURM_EXTRA) or "upbench" in name or name.endswith(".pth") or name == "__pycache__":
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def _venv(path: Path, deps: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(str(deps) + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _run(python: Path, args, cwd: Path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(UPBENCH_RESULTS=str(cwd / "results"), HF_HUB_OFFLINE="1")
    return subprocess.run([str(python)] + list(args), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    # the environments live inside another project's git repository, as a venv in a user's project often does
    subprocess.run(["git", "init", "-q", str(base)], check=True, timeout=60)
    deps = _deps_without_slurm(base / "deps")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(base / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel, = (base / "dist").glob("upbench-*.whl")
    wheel_py = _venv(base / "wheel_env", deps)
    _pip(wheel_py, "install", "--no-deps", "--no-index", str(wheel))
    editable_py = _venv(base / "editable_env", deps)
    _pip(editable_py, "install", "--no-deps", "--no-index", "--no-build-isolation", "-e", str(ROOT))
    work = base / "elsewhere"   # a user's folder with its own `configs` package and `tasks.py`: no clash
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "__init__.py").write_text("raise ImportError('the user configs package was imported')\n")
    (work / "tasks.py").write_text("raise ImportError('the user tasks.py was imported')\n")
    return {"wheel": wheel, "wheel_py": wheel_py, "editable_py": editable_py, "work": work}


def test_the_wheel_holds_only_upbench_and_hydra_plugins(installs):
    names = zipfile.ZipFile(installs["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"upbench", "hydra_plugins"}
    for needed in ("upbench/upsamplers/uplift.py", "upbench/upsamplers/uplift_configs/uplift_dinov2-s14.yaml",
                   "upbench/tasks/seg.py", "upbench/configs/config.yaml", "upbench/configs/task/seg.yaml",
                   "upbench/slurm/cluster/local.yaml", "upbench/slurm/local-cluster.sh",
                   "upbench/assets/uplift_demo.safetensors", "hydra_plugins/upbench_launcher/launcher.py"):
        assert needed in names, needed


@pytest.mark.parametrize("install", ["wheel_py", "editable_py"])
def test_old_top_level_names_are_not_importable(installs, install):
    probe = ("import importlib.util as u, sys, upbench; sys.path.remove(''); "
             "print(upbench.__file__); print([n for n in ('tasks', 'configs', 'slurm', 'upsamplers') if u.find_spec(n)])")
    out = _run(installs[install], ["-c", probe], installs["work"])
    assert out.returncode == 0, out.stderr
    where, found = out.stdout.splitlines()
    assert found == "[]"
    if install == "wheel_py":
        assert "wheel_env" in where and str(ROOT) not in where
    else:
        assert where.startswith(str(ROOT))


def test_wheel_lists_and_runs_a_multirun_from_an_unrelated_folder(installs):
    py, work = installs["wheel_py"], installs["work"]
    listed = _run(py, ["-m", "upbench", "list"], work)
    assert listed.returncode == 0, listed.stderr
    assert "upsamplers: anyup, bicubic, bilinear" in listed.stdout and "  naf " in listed.stdout
    assert "clusters (slurm/cluster/): a100, cpu, local" in listed.stdout
    multirun = _run(py, ["-m", "upbench", "run", "-m", *TINY, "upsampler=bilinear,nearest",
                         "paths.results=wheel_results"], work)
    assert multirun.returncode == 0, multirun.stderr[-2000:]
    assert len(list((work / "wheel_results" / "rows").glob("*.json"))) == 2


def test_without_the_slurm_extra_run_and_the_quick_sweep_work_and_launchers_say_what_is_missing(installs):
    py, work = installs["editable_py"], installs["work"]
    run = _run(py, ["-m", "upbench", "run", *TINY, "upsampler=bilinear", "paths.results=editable_results"], work)
    assert run.returncode == 0, run.stderr[-2000:]
    sweep = _run(py, ["-m", "upbench", "sweep", "scaling", "--quick", "upsamplers=[bilinear]", "sizes=[64]",
                      "paths.results=editable_results"], work)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert "Scaling summary" in sweep.stdout
    slurm = _run(py, ["-m", "upbench", "run", *TINY, "hydra/launcher=slurm"], work)
    assert slurm.returncode == 2 and "Traceback" not in slurm.stderr
    assert "needs the optional package submitit" in slurm.stderr and "upbench[slurm]" in slurm.stderr


def test_provenance_comes_from_upbench_itself_not_the_surrounding_repository(installs):
    probe = "from upbench import results; print(results.git_sha(), results.upbench_version())"
    wheel = _run(installs["wheel_py"], ["-c", probe], installs["work"])
    assert wheel.returncode == 0, wheel.stderr
    assert wheel.stdout.split() == ["None", "0.1.0"]      # a wheel inside another git repo records no commit
    if not (ROOT / ".git").exists():
        pytest.skip("the source tree is not a git checkout: no commit to compare with")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    editable = _run(installs["editable_py"], ["-c", probe], installs["work"])
    assert editable.stdout.split()[0].split("+")[0] == head.strip()
