"""An adversarial corpus: bad inputs and faults the way users and clusters produce them, each run against the CLI.

Every case checks the same contract: the exit code (2 for usage errors, non-zero for failures, 0 where the input is
valid or the fault is recoverable), no ``Traceback`` anywhere in the output, a message that names the offending input,
every finished row byte-for-byte unchanged and no new row unless the case allows one, and no marker file (crafted
pickles create it if anything unpickles them).  Cases run in this process through ``upbench.cli.main``; only those
where the process boundary is what is tested (signals, working directory, start-up, the offline hub client) get a
process of their own.

Classes: 1 code from files, 2 silent wrong numbers, 3 tracebacks for user errors, 4 what a new user meets,
5 valid input refused."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, need

VOC = ASSETS / "data" / "voc2012_val14"
TINY = ["backbone=demo", "dataset=demo", "dataset.img_size=64", "dataset.num_images=4", "task.probe.epochs=1",
        "upsampler=bilinear", "task.cache.upsampled_gb=0"]
VOC_TINY = ["backbone=demo", "dataset=voc", f"dataset.root={VOC}", "dataset.img_size=64",
            "dataset.train_split='val[:3]'", "dataset.val_split='val[3:5]'", "task.probe.epochs=1", "upsampler=bilinear"]


class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@dataclass
class Ctx:
    tmp: Path
    results: Path
    marker: Path
    env: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[Path] = None


@dataclass
class Case:
    id: str
    kind: int                                    # the class (1-5)
    args: Callable[[Ctx], List[str]]             # the command line after `upbench`
    names: Callable[[Ctx], str] = lambda c: ""   # a text the output must contain (the input it names)
    code: Optional[int] = 2                      # expected exit code (None: any non-zero)
    setup: Optional[Callable[[Ctx], None]] = None
    process: bool = False                        # a process of its own
    new_rows: bool = False                       # a valid job: one new row is expected
    check: Optional[Callable[[Ctx, "Out"], None]] = None
    stdin_interrupt: bool = False                # SIGINT after the first epoch


@dataclass
class Out:
    returncode: int
    stdout: str
    stderr: str


# ----------------------------------------------------------------------------------------------- the fixtures
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A results folder with one finished row (each case starts from a copy of it)."""
    root = tmp_path_factory.mktemp("template") / "results"
    out = _run_inprocess(["run", *TINY], {"UPBENCH_RESULTS": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((root / "rows").glob("*.json"))) == 1
    return root


def _snapshot(results: Path) -> Dict[str, bytes]:
    rows = results / "rows"
    return {p.name: p.read_bytes() for p in sorted(rows.glob("*"))} if rows.is_dir() else {}


def _run_inprocess(args: List[str], env: Dict[str, str], cwd: Optional[Path] = None) -> Out:
    """``upbench <args>`` through the console script's entry point, in this process."""
    import contextlib
    import io
    import traceback

    from upbench.cli import main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_cwd = os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:   # noqa: BLE001  (what a user would see as a traceback)
                traceback.print_exc(file=err)
                code = -1
    finally:
        os.chdir(old_cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Out(code, out.getvalue(), err.getvalue())


def _run_process(args: List[str], env: Dict[str, str], cwd: Optional[Path], interrupt: bool = False) -> Out:
    full_env = {**os.environ, **env}
    cmd = [sys.executable, "-m", "upbench", *args]
    if not interrupt:
        p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)
        return Out(p.returncode, p.stdout, p.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd)
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "epoch 2/" in line:   # a checkpoint exists from here on
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    text = "".join(lines) + rest
    return Out(proc.returncode, text, text)


# ----------------------------------------------------------------------------------------------- helpers
def _pickle_to(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _torch_evil(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1), "payload": Evil(marker)}, path)


def _voc_copy(ctx: Ctx, n: int = 5) -> Path:
    """A small flat VOC folder in the case's folder, from the shared images."""
    src = need(VOC)
    dst = ctx.tmp / "voc"
    (dst / "images").mkdir(parents=True)
    (dst / "masks_index").mkdir()
    for img in sorted((src / "images").iterdir())[:n]:
        shutil.copy(img, dst / "images" / img.name)
        shutil.copy(src / "masks_index" / f"{img.stem}.png", dst / "masks_index" / f"{img.stem}.png")
    return dst


def _first(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def _row_hash(ctx: Ctx) -> str:
    return sorted((ctx.results / "rows").glob("*.json"))[0].stem


def _probe_ckpt_of(ctx: Ctx, args: List[str]) -> Path:
    """Where a run of ``args`` keeps its resumable probe state."""
    from upbench.config import compose, to_container
    from upbench.results import ResultStore, config_hash

    cfg = to_container(compose([*args, f"paths.results={ctx.results}"]))
    return ResultStore(str(ctx.results)).checkpoint_path(config_hash(cfg))


def _sweep_record(ctx: Ctx, jobs: List[dict], name: str = "s1") -> None:
    folder = ctx.results / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"sweep": name, "config_name": "config", "jobs": jobs}))


def _job(ctx: Ctx, **extra) -> dict:
    return {"num": 0, "label": "upsampler=bilinear", "overrides": [], "config_name": "config", "config_hash": "x",
            "executor": "local", "result": str(ctx.results / "rows" / "missing.json"), "submitted": True,
            "job_id": "999999999", "stderr": None, "submitit_folder": str(ctx.tmp / "submitit"), **extra}


# ----------------------------------------------------------------------------------------------- the corpus
CASES: List[Case] = []


def case(*args, **kwargs):
    CASES.append(Case(*args, **kwargs))


# --- 1: code from files ----------------------------------------------------------------------------------------
def _evil_probe_ckpt(ctx):
    _torch_evil(_probe_ckpt_of(ctx, [*TINY, "seed=7"]), ctx.marker)


case("evil-probe-checkpoint", 1, lambda c: ["run", *TINY, "seed=7"], lambda c: "checkpoint", code=None,
     setup=_evil_probe_ckpt)


def _raw_pickle_probe_ckpt(ctx):
    _pickle_to(_probe_ckpt_of(ctx, [*TINY, "seed=8"]), {"params": Evil(ctx.marker)})


case("raw-pickle-probe-checkpoint", 1, lambda c: ["run", *TINY, "seed=8"], lambda c: "checkpoint", code=None,
     setup=_raw_pickle_probe_ckpt)
case("evil-upsampler-weights-pth", 1,
     lambda c: ["run", *TINY, "upsampler=featup", f"upsampler.weights={c.tmp / 'w.pth'}"], lambda c: "w.pth",
     setup=lambda c: _torch_evil(c.tmp / "w.pth", c.marker))
case("raw-pickle-upsampler-weights", 1,
     lambda c: ["run", *TINY, "upsampler=jafar", f"upsampler.weights={c.tmp / 'w.pt'}"], lambda c: "w.pt",
     setup=lambda c: _pickle_to(c.tmp / "w.pt", {"state_dict": Evil(c.marker)}))
case("evil-weights-as-ckpt", 1,
     lambda c: ["run", *TINY, "upsampler=lift", f"upsampler.weights={c.tmp / 'w.ckpt'}"], lambda c: "w.ckpt",
     setup=lambda c: _torch_evil(c.tmp / "w.ckpt", c.marker))
case("evil-backbone-weights", 1,
     lambda c: ["run", *TINY, "backbone=timm", "backbone.timm_name=vit_tiny_patch16_224",
                f"backbone.weights={c.tmp / 'b.pth'}"],
     lambda c: "b.pth", setup=lambda c: _torch_evil(c.tmp / "b.pth", c.marker))


def _evil_cache(ctx):
    cache = ctx.tmp / "fcache"
    out = _run_inprocess(["run", *TINY, "seed=3", f"task.cache.dir={cache}"], {"UPBENCH_RESULTS": str(ctx.tmp / "r2")})
    assert out.returncode == 0, out.stderr[-2000:]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files
    for p in files:
        torch.save({"payload": Evil(ctx.marker)}, p)
    _forget_caches()


def _forget_caches():
    """A fresh process would not hold the cache's entries in memory; this one must not either."""
    from upbench import pipeline

    pipeline._DISK_CACHES.clear()


case("evil-feature-cache", 1, lambda c: ["run", *TINY, "seed=3", f"task.cache.dir={c.tmp / 'fcache'}"],
     lambda c: "cache", code=0, setup=_evil_cache, new_rows=True)


def _evil_submitit(ctx):
    folder = ctx.tmp / "submitit"
    _pickle_to(folder / "999999999_0_result.pkl", ("success", Evil(ctx.marker)))
    _pickle_to(folder / "999999999_result.pkl", ("success", Evil(ctx.marker)))
    _sweep_record(ctx, [_job(ctx)])


case("status-never-unpickles-submitit", 1, lambda c: ["status", "--results", str(c.results)], lambda c: "s1",
     code=0, setup=_evil_submitit)


def _evil_npy_depth(ctx):
    root = ctx.tmp / "dfolder"
    (root / "images").mkdir(parents=True)
    (root / "depth_rgba_float32").mkdir()
    src = sorted((need(VOC) / "images").iterdir())
    for i, img in enumerate(src[:4]):
        shutil.copy(img, root / "images" / f"{i}.png")
        np.save(root / "depth_rgba_float32" / f"{i}.npy", np.ones((64, 64), np.float32))
    np.save(root / "depth_rgba_float32" / "0.npy", np.array([Evil(ctx.marker)], dtype=object), allow_pickle=True)


case("evil-npy-depth", 1, lambda c: ["run", "task=depth", "backbone=demo", "dataset=depth_folder",
                                     f"dataset.root={c.tmp / 'dfolder'}", "dataset.img_size=64",
                                     "dataset.train_split='val[:2]'", "dataset.val_split='val[2:]'",
                                     "task.probe.epochs=1", "task.probe.cls_token=false"],
     lambda c: "0.npy", code=None, setup=_evil_npy_depth)


def _evil_probe_artefact(ctx):
    for p in (ctx.results / "artefacts").rglob("probe.safetensors"):
        p.write_bytes(pickle.dumps(Evil(ctx.marker)))


case("evil-saved-probe-viz", 1, lambda c: ["viz", "predictions", "--results", str(c.results), "backbone=demo",
                                           "dataset=demo", "dataset.img_size=64", "dataset.num_images=4"],
     lambda c: "probe", code=None, setup=_evil_probe_artefact)


def _evil_train_state(ctx):
    out = ctx.tmp / "train"
    out.mkdir()
    (out / "train_state.safetensors").write_bytes(pickle.dumps(Evil(ctx.marker)))


TRAIN_TINY = ["backbone=demo", "data.root=builtin:skimage", "data.img_size=64", "data.limit=2", "train.batch_size=2",
              "train.max_steps=1", "train.depths=[1]"]
case("evil-train-state", 1, lambda c: ["train", *TRAIN_TINY, f"train.out_dir={c.tmp / 'train'}"],
     lambda c: "train_state", code=None, setup=_evil_train_state)


def _evil_row(ctx):
    (ctx.results / "rows" / "evil.json").write_bytes(pickle.dumps(Evil(ctx.marker)))


case("pickle-in-rows-report", 1, lambda c: ["report", "--results", str(c.results)], lambda c: "evil.json", code=0,
     setup=_evil_row)


def _evil_taef2(ctx):
    _torch_evil(ctx.tmp / "enc.pth", ctx.marker)


case("evil-vae-weights", 1, lambda c: ["run", "task=generative", "backbone=taef2",
                                       f"backbone.encoder={c.tmp / 'enc.pth'}", "dataset=demo_images",
                                       "dataset.img_size=64", "dataset.limit_val=1", "task.fid=false"],
     lambda c: "enc.pth", code=None, setup=_evil_taef2)

# --- 2: silent wrong numbers -----------------------------------------------------------------------------------
case("probe-lr-1e9-diverges", 2, lambda c: ["run", *TINY, "task.probe.lr=1e9", "task.probe.epochs=2"],
     lambda c: "task.probe.lr", code=1, check=lambda c, o: _failed_record(c, "diverged"))
case("probe-lr-inf", 2, lambda c: ["run", *TINY, "task.probe.lr=inf"], lambda c: "task.probe.lr")
case("probe-lr-nan", 2, lambda c: ["run", *TINY, "task.probe.lr=nan"], lambda c: "task.probe.lr")
case("probe-lr-negative", 2, lambda c: ["run", *TINY, "task.probe.lr=-0.1"], lambda c: "task.probe.lr")
case("probe-lr-zero", 2, lambda c: ["run", *TINY, "task.probe.lr=0"], lambda c: "task.probe.lr")
case("probe-epochs-zero", 2, lambda c: ["run", *TINY, "task.probe.epochs=0"], lambda c: "task.probe.epochs")
case("probe-batch-zero", 2, lambda c: ["run", *TINY, "task.probe.batch_size=0"], lambda c: "task.probe.batch_size")
case("probe-weight-decay-negative", 2, lambda c: ["run", *TINY, "task.probe.weight_decay=-1"],
     lambda c: "task.probe.weight_decay")
case("depth-lr-1e9-diverges", 2, lambda c: ["run", "task=depth", "backbone=demo", "dataset=demo_depth",
                                            "dataset.img_size=64", "dataset.num_images=3", "dataset.limit_val=2",
                                            "task.probe.epochs=10", "task.probe.cls_token=false",
                                            "task.probe.lr=1e9"],
     lambda c: "task.probe.lr", code=1, check=lambda c, o: _failed_record(c, "diverged"))
case("limit-train-negative", 2, lambda c: ["run", *TINY, "dataset.limit_train=-1"], lambda c: "dataset.limit_train")
case("limit-val-zero", 2, lambda c: ["run", *TINY, "dataset.limit_val=0"], lambda c: "dataset.limit_val")
case("img-size-zero", 2, lambda c: ["run", *TINY, "dataset.img_size=0"], lambda c: "dataset.img_size")
case("img-size-negative", 2, lambda c: ["run", *TINY, "dataset.img_size=-64"], lambda c: "dataset.img_size")
case("empty-train-slice", 2, lambda c: ["run", *VOC_TINY, "dataset.train_split='val[5:2]'"],
     lambda c: "dataset.train_split")
case("slice-past-end", 2, lambda c: ["run", *VOC_TINY, "dataset.val_split='val[100:200]'"],
     lambda c: "dataset.val_split")
case("threads-zero", 2, lambda c: ["run", *TINY, "threads=0"], lambda c: "threads")
case("threads-negative", 2, lambda c: ["run", *TINY, "threads=-2"], lambda c: "threads")
case("sweep-memory-negative", 2, lambda c: ["sweep", "scaling", "--quick", "memory_limit_gb=-1"],
     lambda c: "memory_limit_gb")
case("sweep-sizes-empty", 2, lambda c: ["sweep", "scaling", "sizes=[]"], lambda c: "sizes")
case("sweep-size-negative", 2, lambda c: ["sweep", "scaling", "sizes=[-64,128]"], lambda c: "sizes")
case("sweep-time-limit-zero", 2, lambda c: ["sweep", "scaling", "--quick", "time_limit_s=0"],
     lambda c: "time_limit_s")
case("train-lr-1e9-diverges", 2, lambda c: ["train", *TRAIN_TINY, "train.lr=1e12", "train.max_steps=3",
                                            "train.epochs=4",
                                            f"train.out_dir={c.tmp / 't'}"], lambda c: "train.lr", code=1,
     check=lambda c, o: _no_weights(c.tmp / "t"))
case("train-lr-negative", 2, lambda c: ["train", *TRAIN_TINY, "train.lr=-1", f"train.out_dir={c.tmp / 't'}"],
     lambda c: "train.lr")


def _label16(ctx):
    root = _voc_copy(ctx)
    lbl = _first(root / "masks_index")
    arr = np.array(Image.open(lbl)).astype(np.int32)
    arr[:5, :5] = 300
    Image.fromarray(arr.astype(np.uint16)).save(lbl)


case("label-16bit-out-of-range", 2, lambda c: ["run", *_voc_args(c)], lambda c: "masks_index", code=None,
     setup=_label16)


def _voc_args(ctx, train="val[:3]", val="val[3:5]"):
    return ["backbone=demo", "dataset=voc", f"dataset.root={ctx.tmp / 'voc'}", "dataset.img_size=64",
            f"dataset.train_split='{train}'", f"dataset.val_split='{val}'", "task.probe.epochs=1",
            "upsampler=bilinear"]


def _label_out_of_range(ctx):
    root = _voc_copy(ctx)
    lbl = _first(root / "masks_index")
    arr = np.array(Image.open(lbl))
    arr[:5, :5] = 77
    Image.fromarray(arr).save(lbl)


case("label-id-out-of-range", 2, lambda c: ["run", *_voc_args(c)], lambda c: "masks_index", code=None,
     setup=_label_out_of_range)


def _size_mismatch(ctx):
    root = _voc_copy(ctx)
    lbl = _first(root / "masks_index")
    arr = np.array(Image.open(lbl))
    Image.fromarray(arr[: arr.shape[0] // 2]).save(lbl)


case("image-label-size-mismatch", 2, lambda c: ["run", *_voc_args(c)], lambda c: "masks_index", code=None,
     setup=_size_mismatch)


def _all_ignore_val(ctx):
    root = _voc_copy(ctx)
    for lbl in sorted((root / "masks_index").iterdir())[3:5]:
        arr = np.array(Image.open(lbl))
        Image.fromarray(np.full_like(arr, 255)).save(lbl)


case("val-labels-all-ignore", 2, lambda c: ["run", *_voc_args(c)], lambda c: "val", code=None,
     setup=_all_ignore_val)

# --- 3: tracebacks for user errors ----------------------------------------------------------------------------
case("epochs-not-a-number", 3, lambda c: ["run", *TINY, "task.probe.epochs=abc"], lambda c: "task.probe.epochs")
case("lr-not-a-number", 3, lambda c: ["run", *TINY, "task.probe.lr=fast"], lambda c: "task.probe.lr")
case("flip-not-a-bool", 3, lambda c: ["run", *TINY, "task.probe.flip=maybe"], lambda c: "task.probe.flip")
case("img-size-float", 3, lambda c: ["run", *TINY, "dataset.img_size=64.5"], lambda c: "dataset.img_size")
case("seed-not-a-number", 3, lambda c: ["run", *TINY, "seed=abc"], lambda c: "seed")
case("threads-not-a-number", 3, lambda c: ["run", *TINY, "threads=many"], lambda c: "threads")
case("betas-not-a-list", 3, lambda c: ["run", *TINY, "task.probe.betas=0.9"], lambda c: "task.probe.betas")
case("multirun-bad-value", 3, lambda c: ["run", "-m", *TINY, "task.probe.epochs=1,abc"], lambda c: "task.probe.epochs")
case("unknown-key", 3, lambda c: ["run", *TINY, "task.probe.lrr=0.1"], lambda c: "task.probe.lrr")
case("unknown-top-key", 3, lambda c: ["run", *TINY, "sede=1"], lambda c: "sede")
case("bad-override-syntax", 3, lambda c: ["run", *TINY, "dataset.train_split=val[:3"],
     lambda c: "dataset.train_split")
case("no-equals", 3, lambda c: ["run", *TINY, "bilinear"], lambda c: "bilinear")
case("unknown-device", 3, lambda c: ["run", *TINY, "device=tpu"], lambda c: "device")
case("cuda-on-cpu", 3, lambda c: ["run", *TINY, "device=cuda:7"], lambda c: "device")
case("unknown-upsampler", 3, lambda c: ["run", *TINY, "upsampler=bilnear"], lambda c: "bilnear")
case("unknown-task", 3, lambda c: ["run", "task=segg"], lambda c: "segg")
case("unknown-dataset", 3, lambda c: ["run", "dataset=vocc"], lambda c: "vocc")
case("unknown-protocol", 3, lambda c: ["run", "protocol=jafar"], lambda c: "jafar")
case("unknown-lr-schedule", 3, lambda c: ["run", *TINY, "task.probe.lr_schedule=cosine"], lambda c: "cosine")
case("unknown-optimizer", 3, lambda c: ["run", *TINY, "task.probe.optimizer=sgd"], lambda c: "sgd")
case("unknown-resize-at", 3, lambda c: ["run", *TINY, "task.resize_at=somewhere"], lambda c: "somewhere")
case("unknown-verb", 3, lambda c: ["runn", *TINY], lambda c: "runn")
case("unknown-sweep", 3, lambda c: ["sweep", "scalling"], lambda c: "scalling")
case("unknown-viz-kind", 3, lambda c: ["viz", "pie"], lambda c: "pie")
case("unknown-launcher", 3, lambda c: ["run", *TINY, "hydra/launcher=pbs"], lambda c: "pbs")
case("unknown-cluster", 3, lambda c: ["run", *TINY, "cluster=summit"], lambda c: "summit")
SEG_ON = ["backbone=demo", "dataset.img_size=64", "task.probe.epochs=1", "upsampler=bilinear"]
case("missing-dataset-root", 3, lambda c: ["run", *SEG_ON, "dataset=voc", f"dataset.root={c.tmp / 'nowhere'}"],
     lambda c: "nowhere")
case("dataset-root-is-a-file", 3, lambda c: ["run", *SEG_ON, "dataset=voc", f"dataset.root={c.tmp / 'f.txt'}"],
     lambda c: "f.txt", setup=lambda c: (c.tmp / "f.txt").write_text("x"))
case("empty-dataset-folder", 3, lambda c: ["run", *SEG_ON, "dataset=ade20k", f"dataset.root={c.tmp}"],
     lambda c: "ade20k")
case("depth-task-on-seg-data", 3, lambda c: ["run", *SEG_ON, "task=depth", "dataset=voc", f"dataset.root={VOC}"],
     lambda c: "depth")


def _truncated_jpeg(ctx):
    root = _voc_copy(ctx)
    img = _first(root / "images")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3])


case("truncated-image", 3, lambda c: ["run", *_voc_args(c)], lambda c: "images", code=None, setup=_truncated_jpeg)


def _garbage_image(ctx):
    root = _voc_copy(ctx)
    _first(root / "images").write_bytes(os.urandom(2000))


case("garbage-image", 3, lambda c: ["run", *_voc_args(c)], lambda c: "images", code=None, setup=_garbage_image)


def _garbage_label(ctx):
    root = _voc_copy(ctx)
    _first(root / "masks_index").write_bytes(b"not a png at all")


case("garbage-label", 3, lambda c: ["run", *_voc_args(c)], lambda c: "masks_index", code=None, setup=_garbage_label)


def _weights_file(ctx, name, data):
    (ctx.tmp / name).write_bytes(data)


case("truncated-safetensors", 3,
     lambda c: ["run", *TINY, "upsampler=featup", f"upsampler.weights={c.tmp / 'w.safetensors'}"],
     lambda c: "w.safetensors",
     setup=lambda c: _weights_file(c, "w.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": "))
case("garbage-pth", 3, lambda c: ["run", *TINY, "upsampler=featup", f"upsampler.weights={c.tmp / 'w.pth'}"],
     lambda c: "w.pth", setup=lambda c: _weights_file(c, "w.pth", os.urandom(500)))
case("empty-pth", 3, lambda c: ["run", *TINY, "upsampler=jafar", f"upsampler.weights={c.tmp / 'w.pth'}"],
     lambda c: "w.pth", setup=lambda c: _weights_file(c, "w.pth", b""))
case("weights-wrong-model", 3, lambda c: ["run", *TINY, "upsampler=jafar", f"upsampler.weights={c.tmp / 'w.pth'}"],
     lambda c: "w.pth", setup=lambda c: torch.save({"foo.weight": torch.zeros(3)}, c.tmp / "w.pth"))
case("weights-is-a-directory", 3, lambda c: ["run", *TINY, "upsampler=featup", f"upsampler.weights={c.tmp}"],
     lambda c: str(c.tmp))
case("weights-missing-file", 3,
     lambda c: ["run", *TINY, "upsampler=featup", f"upsampler.weights={c.tmp / 'none.pth'}"], lambda c: "none.pth")


def _corrupt_cache(ctx):
    cache = ctx.tmp / "fcache"
    out = _run_inprocess(["run", *TINY, "seed=4", f"task.cache.dir={cache}"], {"UPBENCH_RESULTS": str(ctx.tmp / "r2")})
    assert out.returncode == 0, out.stderr[-2000:]
    for p in (p for p in cache.rglob("*") if p.is_file()):
        p.write_bytes(p.read_bytes()[:40])
    _forget_caches()


case("corrupt-feature-cache", 3, lambda c: ["run", *TINY, "seed=4", f"task.cache.dir={c.tmp / 'fcache'}"],
     lambda c: "cache", code=0, setup=_corrupt_cache, new_rows=True)


def _corrupt_same_hash_row(ctx):
    (ctx.results / "rows" / f"{_row_hash(ctx)}.json").write_text("{\"task\": \"seg\", trunc")


case("corrupt-row-same-hash", 3, lambda c: ["run", *TINY], lambda c: ".json", code=0, setup=_corrupt_same_hash_row,
     new_rows=True, check=lambda c, o: _rows_valid(c))


def _future_row(ctx):
    row = json.loads(sorted((ctx.results / "rows").glob("*.json"))[0].read_text())
    (ctx.results / "rows" / "future.json").write_text(json.dumps({**row, "schema": 99}))


case("report-future-schema", 3, lambda c: ["report", "--results", str(c.results)], lambda c: "future.json", code=0,
     setup=_future_row)
case("report-non-object-json", 3, lambda c: ["report", "--results", str(c.results)], lambda c: "list.json", code=0,
     setup=lambda c: (c.results / "rows" / "list.json").write_text("[1, 2, 3]"))
case("report-binary-file", 3, lambda c: ["report", "--results", str(c.results)], lambda c: "bin.json", code=0,
     setup=lambda c: (c.results / "rows" / "bin.json").write_bytes(os.urandom(64)))
case("report-nan-in-row", 3, lambda c: ["report", "--results", str(c.results)], lambda c: "nan.json", code=0,
     setup=lambda c: (c.results / "rows" / "nan.json").write_text(
         sorted((c.results / "rows").glob("*.json"))[0].read_text().replace("\"ok\"", "\"ok\", \"x\": NaN", 1)))
case("report-missing-results", 3, lambda c: ["report", "--results", str(c.tmp / "nothing")], lambda c: "nothing")
case("report-results-is-file", 3, lambda c: ["report", "--results", str(c.tmp / "f")], lambda c: str(c.tmp / "f"),
     setup=lambda c: (c.tmp / "f").write_text("x"))
case("status-corrupt-record", 3, lambda c: ["status", "--results", str(c.results)], lambda c: "s1.json",
     setup=lambda c: ((c.results / "jobs").mkdir(), (c.results / "jobs" / "s1.json").write_text("{trunc")))
case("status-record-not-object", 3, lambda c: ["status", "--results", str(c.results)], lambda c: "s1.json",
     setup=lambda c: ((c.results / "jobs").mkdir(), (c.results / "jobs" / "s1.json").write_text("[]")))
case("status-record-missing-fields", 3, lambda c: ["status", "--results", str(c.results)], lambda c: "s1",
     setup=lambda c: _sweep_record(c, [{"num": 0}]))
case("status-unknown-sweep", 3, lambda c: ["status", "--results", str(c.results), "--sweep", "zzz"],
     lambda c: "zzz", setup=lambda c: _sweep_record(c, [_job(c)]))


def _readonly_results():
    """A results folder that cannot be written (root ignores permissions: a read-only kernel folder then)."""
    return "/sys/kernel" if os.geteuid() == 0 else None


def _make_readonly(ctx):
    if os.geteuid() != 0:
        ro = ctx.tmp / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)


case("results-read-only", 3, lambda c: ["run", *TINY, f"paths.results={_readonly_results() or c.tmp / 'ro'}"],
     lambda c: "paths.results", code=None, setup=_make_readonly)
case("results-is-a-file", 3, lambda c: ["run", *TINY, f"paths.results={c.tmp / 'f'}"], lambda c: "paths.results",
     code=None, setup=lambda c: (c.tmp / "f").write_text("x"))
case("results-name-too-long", 3, lambda c: ["run", *TINY, f"paths.results={c.tmp / ('x' * 300)}"],
     lambda c: "paths.results", code=None)
case("cwd-not-writable", 3, lambda c: ["run", *TINY], lambda c: "results", code=None, process=True)


def _interrupt_env(ctx):
    ctx.env["UPBENCH_RESULTS"] = str(ctx.results)


INTERRUPT = ["backbone=demo", "dataset=demo", "dataset.img_size=64", "dataset.num_images=12", "task.probe.epochs=400",
             "upsampler=bilinear", "seed=11"]
case("sigint-during-run", 3, lambda c: ["run", *INTERRUPT], lambda c: "interrupted", code=130, process=True,
     stdin_interrupt=True, check=lambda c, o: _interrupted(c, o))
case("viz-no-rows", 3, lambda c: ["viz", "perclass", "--results", str(c.tmp / "empty")], lambda c: "perclass",
     code=2)
case("viz-bad-option", 3, lambda c: ["viz", "pca", "--colour", "red"], lambda c: "--colour")
case("report-bad-option", 3, lambda c: ["report", "--fancy"], lambda c: "--fancy")
case("status-bad-option", 3, lambda c: ["status", "--everything"], lambda c: "--everything")
case("sweep-bad-option", 3, lambda c: ["sweep", "scaling", "--fast"], lambda c: "--fast")
case("train-missing-root", 3, lambda c: ["train", "backbone=demo"], lambda c: "data.root")
case("train-root-missing-folder", 3, lambda c: ["train", "backbone=demo", f"data.root={c.tmp / 'none'}"],
     lambda c: "none")
case("timm-not-a-vit", 3, lambda c: ["run", *TINY, "backbone=timm", "backbone.timm_name=resnet18",
                                     "backbone.pretrained=false"], lambda c: "resnet18")
case("timm-unknown-model", 3, lambda c: ["run", *TINY, "backbone=timm", "backbone.timm_name=not_a_model"],
     lambda c: "not_a_model")
case("attender-size-bad", 3, lambda c: ["run", *TINY, "upsampler=uplift", "upsampler.weights=null",
                                        "upsampler.kwargs.attender=7"], lambda c: "attender")
case("protocol-wrong-task", 3, lambda c: ["run", "protocol=naf", "task=depth"], lambda c: "protocol=naf")

# --- 4: what a new user meets ---------------------------------------------------------------------------------
case("flat-folder-no-splits", 4, lambda c: ["run", "backbone=demo", "dataset=voc", f"dataset.root={c.tmp / 'voc'}",
                                            "dataset.img_size=64", "task.probe.epochs=1"],
     lambda c: "dataset.train_split", setup=lambda c: _voc_copy(c))
case("uplift-offline-weights", 4, lambda c: ["run", *TINY, "upsampler=uplift", "upsampler.weights=uplift_dinov2-s14"],
     lambda c: "upsampler.weights", code=None, check=lambda c, o: _not_cut(o))
case("default-run-offline", 4, lambda c: ["run"], lambda c: "HF_HUB_OFFLINE", code=None, process=True,
     check=lambda c, o: _few_lines(o, 3))
case("demo-help", 4, lambda c: ["demo", "--help"], lambda c: "demo", code=0)
case("run-help", 4, lambda c: ["run", "--help"], lambda c: "upbench", code=0,
     check=lambda c, o: _contains(o, "upbench is powered by Hydra"))
case("top-help", 4, lambda c: ["--help"], lambda c: "upbench run", code=0, process=True,
     check=lambda c, o: _not_contains(o, "thin layer"))
case("top-help-no-torch", 4, lambda c: ["-c", "import sys, runpy; sys.argv=['upbench', '--help']; "
                                        "runpy.run_module('upbench', run_name='__main__')"],
     lambda c: "upbench run", code=0, process=True, check=lambda c, o: None)
case("version", 4, lambda c: ["--version"], lambda c: "upbench 0.", code=0)
case("status-nothing-submitted", 4, lambda c: ["status", "--results", str(c.tmp / "fresh")], lambda c: "no submitted",
     code=0)
case("probe-cannot-converge-hint", 4, lambda c: ["run", *TINY, "task.probe.lr=1e-7", "task.probe.epochs=10",
                                                  "seed=5"],
     lambda c: "task.probe.lr", code=0, new_rows=True, check=lambda c, o: _row_note(c, "task.probe.lr"))
case("list-works", 4, lambda c: ["list"], lambda c: "upsamplers", code=0)

# --- 5: valid input refused -----------------------------------------------------------------------------------


def _unicode_root(ctx):
    src = _voc_copy(ctx)
    src.rename(ctx.tmp / "données été")


case("unicode-path-unquoted", 5, lambda c: ["run", *VOC_TINY, f"dataset.root={c.tmp / 'données été'}"],
     lambda c: "", code=0, setup=_unicode_root, new_rows=True)
case("unicode-path-quoted", 5, lambda c: ["run", *VOC_TINY, f"dataset.root='{c.tmp / 'données été'}'", "seed=2"],
     lambda c: "", code=0, setup=_unicode_root, new_rows=True)
case("space-in-path", 5, lambda c: ["run", *VOC_TINY, f"dataset.root={c.tmp / 'my data'}", "seed=3"],
     lambda c: "", code=0, setup=lambda c: _voc_copy(c).rename(c.tmp / "my data"), new_rows=True)
case("plus-protocol", 5, lambda c: ["run", "+protocol=naf", "--cfg", "job"], lambda c: "naf", code=0)
case("report-empty-folder", 5, lambda c: ["report", "--results", str(c.results)], lambda c: "", code=0)


# ----------------------------------------------------------------------------------------------- extra checks
def _failed_record(ctx: Ctx, word: str) -> None:
    recs = [json.loads(p.read_text()) for p in (ctx.results / "failed").glob("*.json")]
    assert recs and all(r["status"] == "failed" and not r.get("metrics") for r in recs), recs
    assert any(word in (r.get("error") or "") for r in recs), [r.get("error") for r in recs]


def _no_weights(folder: Path) -> None:
    assert not list(folder.glob("*.safetensors")) or list(folder.glob("train_state*")), list(folder.iterdir())
    assert not [p for p in folder.glob("*.safetensors") if p.name != "train_state.safetensors"]


def _rows_valid(ctx: Ctx) -> None:
    for p in (ctx.results / "rows").glob("*.json"):
        json.loads(p.read_text())


def _interrupted(ctx: Ctx, out: Out) -> None:
    assert list((ctx.results / "checkpoints").glob("*")), "the checkpoint is kept for resume"
    assert "Traceback" not in out.stdout and "KeyboardInterrupt" not in out.stdout


def _not_cut(out: Out) -> None:
    line = [ln for ln in out.stderr.splitlines() if "error" in ln][-1]
    assert not line.rstrip().endswith(("aga)", "ag", "...")), line


def _few_lines(out: Out, n: int) -> None:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) <= n, "\n".join(lines[:60])


def _contains(out: Out, text: str) -> None:
    assert text in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]


def _not_contains(out: Out, text: str) -> None:
    assert text not in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]


def _row_note(ctx: Ctx, text: str) -> None:
    rows = [json.loads(p.read_text()) for p in (ctx.results / "rows").glob("*.json")]
    assert any(text in (r.get("note") or "") for r in rows), [r.get("note") for r in rows]


# ----------------------------------------------------------------------------------------------- the test
PROCESS_ENV = {"HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_corpus(c: Case, template, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(template, results)
    ctx = Ctx(tmp=tmp_path, results=results, marker=tmp_path / "MARKER",
              env={"UPBENCH_RESULTS": str(results), **PROCESS_ENV})
    if c.setup:
        c.setup(ctx)
    before = _snapshot(results)
    args = c.args(ctx)
    if c.id == "cwd-not-writable":
        ctx.env.pop("UPBENCH_RESULTS")
        ctx.cwd = Path(_readonly_results() or tmp_path / "ro")
        if os.geteuid() != 0:
            ctx.cwd.mkdir()
            os.chmod(ctx.cwd, 0o555)
    if c.id == "default-run-offline":
        ctx.env.pop("HF_HUB_OFFLINE")
        ctx.env["HF_ENDPOINT"] = "http://127.0.0.1:9"   # nothing listens there: as offline as a cluster node
    if c.id.startswith("top-help-no-torch"):
        out = _no_torch_help(ctx)
    elif c.process:
        out = _run_process(args, ctx.env, ctx.cwd, interrupt=c.stdin_interrupt)
    else:
        out = _run_inprocess(args, ctx.env, ctx.cwd)
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-4000:]
    if c.code is None:
        assert out.returncode not in (0, -1), (out.returncode, text[-3000:])
    else:
        assert out.returncode == c.code, (out.returncode, text[-3000:])
    assert c.names(ctx) in text, (c.names(ctx), text[-3000:])
    if out.returncode not in (0, 130):
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("upbench: error:")]
        assert len(errors) == 1, out.stderr[-3000:]
    assert not ctx.marker.exists(), "a crafted file ran code"
    after = _snapshot(results)
    changed = {k for k in before if k in after and before[k] != after[k] and k.endswith(".json")}
    if c.id == "corrupt-row-same-hash":
        changed.discard(f"{sorted(before)[0]}")
    assert not changed, f"finished rows changed: {changed}"
    assert set(before) <= set(after), f"rows lost: {set(before) - set(after)}"
    new = set(after) - set(before)
    if not c.new_rows:
        assert not new, f"rows written: {new}"
    if c.check:
        c.check(ctx, out)


def _no_torch_help(ctx: Ctx) -> Out:
    code = ("import sys; import upbench.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    pass\n"
            "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NO_TORCH" in p.stdout, p.stdout + p.stderr
    return Out(p.returncode, p.stdout, p.stderr)


def test_the_corpus_covers_every_class_with_many_cases():
    counts = {k: sum(1 for c in CASES if c.kind == k) for k in range(1, 6)}
    assert all(counts[k] >= (5 if k == 5 else 10) for k in counts), counts
    assert len({c.id for c in CASES}) == len(CASES)
