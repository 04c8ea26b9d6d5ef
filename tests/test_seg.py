import numpy as np
import pytest
import torch

from upbench.tasks._probe import make_scheduler
from upbench.cli import compose
from upbench.errors import UpbenchError
from upbench.cache import FeatureCache
from upbench.results import ResultStore
from upbench.runner import run_job

TINY = ["dataset=demo", "backbone=demo", "dataset.img_size=64", "dataset.num_images=4", "dataset.limit_val=2",
        "task.probe.epochs=2"]


def tiny_cfg(tmp_path, *extra):
    return compose(TINY + [f"paths.results={tmp_path}"] + list(extra))


def test_seg_probe_end_to_end_row_skip_and_force(tmp_path):
    logs = []
    row = run_job(tiny_cfg(tmp_path, "upsampler=bilinear"), log=logs.append)
    assert row["task"] == "seg" and row["upsampler"] == "bilinear" and row["dataset"] == "demo"
    assert 0 <= row["metrics"]["miou"] <= 100 and 0 <= row["metrics"]["acc"] <= 100
    assert row["config"]["task"]["probe"]["lr_schedule"] == "per_epoch"
    assert row["versions"]["torch"] and row["device"]["type"] == "cpu" and len(row["timing"]["probe_epochs_s"]) == 2
    store = ResultStore(str(tmp_path))
    assert [r["config_hash"] for r in store.rows()] == [row["config_hash"]]
    # identical config: skipped, not recomputed
    again = run_job(tiny_cfg(tmp_path, "upsampler=bilinear"), log=logs.append)
    assert again == row and any(line.startswith("[skip]") for line in logs)
    # force=true recomputes (same hash, same deterministic metrics)
    forced = run_job(tiny_cfg(tmp_path, "upsampler=bilinear", "force=true"), log=logs.append)
    assert forced["started"] >= row["started"] and forced["metrics"]["miou"] == pytest.approx(row["metrics"]["miou"])


def test_feature_cache_is_used_once_per_image_and_flip(tmp_path):
    # 3 epochs x 4 train images + 2 val images = 14 look-ups, with upsampled features not kept, plus the one that
    # tells the task the feature grid
    cfg = ["upsampler=nearest", "task.cache.upsampled_gb=0", "task.probe.epochs=3"]
    cache = FeatureCache()
    run_job(tiny_cfg(tmp_path, *cfg), log=lambda s: None, cache=cache)
    assert cache.hits + cache.misses == 15 and cache.misses <= 4 * 2 + 2
    off = FeatureCache(enabled=False)
    run_job(tiny_cfg(tmp_path, *cfg, "force=true"), log=lambda s: None, cache=off)
    assert off.misses == 15 and off.hits == 0


def test_probe_learns_the_demo_task(tmp_path):
    row = run_job(compose(["dataset=demo", "backbone=demo", "upsampler=bilinear", "dataset.img_size=160",
                           "dataset.num_images=12", "dataset.limit_val=4", "task.probe.epochs=6",
                           "task.probe.lr=1e-2", f"paths.results={tmp_path}"]), log=lambda s: None)
    chance = 100 / 6
    assert row["metrics"]["acc"] > 2 * chance
    assert row["metrics"]["final_train_loss"] < 0.8 * np.log(6)


def _lrs(mode, epochs=4, iters=3):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched, per_iter = make_scheduler(opt, mode, epochs, iters)
    seen = []
    for _ in range(epochs):
        for _ in range(iters):
            seen.append(opt.param_groups[0]["lr"])
            if per_iter:
                sched.step()
        if not per_iter:
            sched.step()
    return np.array(seen)


def test_lr_schedules():
    per_epoch = _lrs("per_epoch")
    assert (per_epoch.reshape(4, 3) == per_epoch.reshape(4, 3)[:, :1]).all()  # constant within an epoch
    assert (np.diff(per_epoch.reshape(4, 3)[:, 0]) < 0).all()                   # monotone decay
    jafar = _lrs("per_iter_jafar")  # T_max = epochs, stepped per iteration: reaches 0 after 4 iterations and rises
    assert jafar[4] == pytest.approx(0, abs=1e-12) and jafar[8] == pytest.approx(1.0)
    total = _lrs("per_iter_total")
    assert (np.diff(total) < 0).all()
    with pytest.raises(UpbenchError, match="per_epoch"):
        _lrs("cosine")


def test_metrics_match_a_confusion_matrix():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    from upbench.tasks._seg_metrics import ConfusionMatrix

    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[0, :3] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target.clamp(max=3), torch.randint(0, 4, target.shape, generator=g))
    valid = target != 255
    cm = np.zeros((4, 4))
    for t, p in zip(target[valid].tolist(), pred[valid].tolist()):
        cm[t, p] += 1
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    ours = ConfusionMatrix(4, 255)
    ours.update(pred[:1], target[:1])   # streamed over two updates
    ours.update(pred[1:], target[1:])
    assert ours.miou() == pytest.approx(iou.mean(), abs=1e-9)
    assert ours.accuracy() == pytest.approx(np.diag(cm).sum() / cm.sum(), abs=1e-9)
    np.testing.assert_allclose(ours.iou().numpy(), iou, atol=1e-9)
    miou = MulticlassJaccardIndex(num_classes=4, average="macro", ignore_index=255)(pred, target)
    acc = MulticlassAccuracy(num_classes=4, average="micro", ignore_index=255)(pred, target)
    assert float(miou) == pytest.approx(iou.mean(), abs=1e-6)
    assert float(acc) == pytest.approx(np.diag(cm).sum() / cm.sum(), abs=1e-6)


@pytest.mark.parametrize("ignore", [255, 0, None])
def test_confusion_matrix_scores_equal_torchmetrics(ignore):
    """The seg tasks' scores are torchmetrics' (macro / per-class Jaccard, micro accuracy), also with classes that
    are neither labelled nor predicted and with an ignore index inside the class range."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    from upbench.tasks._seg_metrics import ConfusionMatrix

    g = torch.Generator().manual_seed(3)
    k = 7
    target = torch.randint(0, 5, (3, 20, 24), generator=g)            # classes 5, 6 never labelled...
    noise = torch.randint(0, 5, target.shape, generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target, noise)
    pred[0, 0, :4] = 5                                                  # ...5 predicted, 6 never seen at all
    if ignore == 255:
        target[1, :5] = 255
    ours = ConfusionMatrix(k, ignore)
    for p, t in zip(pred, target):
        ours.update(p[None], t[None])
    ref_macro = MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=ignore)(pred, target)
    ref_none = MulticlassJaccardIndex(num_classes=k, average="none", ignore_index=ignore)(pred, target)
    ref_acc = MulticlassAccuracy(num_classes=k, average="micro", ignore_index=ignore)(pred, target)
    assert ours.miou() == pytest.approx(float(ref_macro), abs=1e-6)
    np.testing.assert_allclose(ours.iou().numpy(), ref_none.numpy(), atol=1e-6)
    assert ours.accuracy() == pytest.approx(float(ref_acc), abs=1e-6)
    assert ours.iou()[6] == 0 and ours.iou()[5] == 0
    labelled = target[target != ignore] if ignore is not None else target
    assert ours.support().tolist() == torch.bincount(labelled.flatten(), minlength=k)[:k].tolist()


def test_split_slices_partition_one_folder(tmp_path):
    from upbench.runner import build_datasets

    train, val = build_datasets({"name": "demo", "train_split": "val[:5]", "val_split": "val[5:]",
                                 "img_size": 32, "num_images": 8})
    assert (len(train), len(val)) == (5, 3)
    assert val[0]["id"] == "demo_val_0005" and train.num_classes == 6 and val.img_size == 32
    with pytest.raises(UpbenchError, match=r"train_split=val\[a:b\]: use name or name\[start:stop\]"):
        build_datasets({"name": "demo", "train_split": "val[a:b]", "img_size": 32})


def test_recon_task_rows(tmp_path):
    # nearest vs bilinear on the demo backbone: both produce finite errors; the task compares with 2x features
    rows = {}
    for up in ("bilinear", "nearest"):
        rows[up] = run_job(compose(["task=recon", "dataset=demo", "backbone=demo", f"upsampler={up}",
                                    "dataset.img_size=128", "dataset.num_images=3", f"paths.results={tmp_path}"]),
                           log=lambda s: None)
    for row in rows.values():
        assert row["task"] == "recon" and row["metrics"]["mse"] > 0 and -1 <= row["metrics"]["cosine"] <= 1
    assert rows["bilinear"]["metrics"]["mse"] != rows["nearest"]["metrics"]["mse"]


def test_disk_feature_cache_is_reused_across_processes(tmp_path):
    from upbench.runner import feature_cache

    cache_dir = tmp_path / "features"
    first = FeatureCache(directory=str(cache_dir))
    calls = []
    entry = first.get(("bb", "img0", 64, False), lambda: (calls.append(1) or torch.ones(2, 3), torch.zeros(0, 2)))
    second = FeatureCache(directory=str(cache_dir))  # a new process: empty memory, same directory
    again = second.get(("bb", "img0", 64, False), lambda: (calls.append(1) or torch.zeros(2, 3), torch.zeros(0, 2)))
    assert calls == [1] and torch.equal(again[0], entry[0]) and second.hits == 1
    assert feature_cache({"features": True, "dir": str(cache_dir)}).directory == str(cache_dir)
    assert not feature_cache({"features": False}).enabled
