"""The core's one data path: the feature cache is keyed by the backbone's full config (weights included) and the
dataset's identity, the output-size contract is checked, and every upsampler call is timed on the device."""
import pytest
import torch

from upbench.cache import FeatureCache
from upbench.config import compose, to_container
from upbench.errors import UpbenchError
from upbench.pipeline import Pipeline, backbone_identity, build_backbone, build_datasets, dataset_identity
from upbench.runner import run_job

TINY = ["task=seg", "backbone=demo", "dataset=demo", "upsampler=bilinear", "dataset.img_size=64",
        "dataset.num_images=4", "dataset.limit_val=2", "task.probe.epochs=1"]


@pytest.fixture(scope="module")
def other_demo_weights(tmp_path_factory):
    """EfficientNet-Lite0 weights that are not the demo's: a random init of the same architecture (a .pth keeps the
    key order, which the demo backbone's positional remapping relies on)."""
    import timm

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "lite0_random.pth"
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), path)
    return path


def test_two_backbones_with_different_weights_in_one_process_get_their_own_features_and_rows(tmp_path,
                                                                                             other_demo_weights):
    """Regression: the cache key used to be the backbone's name, so the second job reused the first one's features."""
    first = run_job(to_container(compose(TINY + [f"paths.results={tmp_path}"])), log=lambda *_: None)
    second = run_job(to_container(compose(TINY + [f"paths.results={tmp_path}",
                                                   f"backbone.weights={other_demo_weights}"])), log=lambda *_: None)
    fresh = run_job(to_container(compose(TINY + [f"paths.results={tmp_path / 'fresh'}",
                                                  f"backbone.weights={other_demo_weights}"])),
                    log=lambda *_: None, cache=FeatureCache())
    assert second["config"]["backbone"]["weights"] == str(other_demo_weights)
    assert second["config_hash"] != first["config_hash"]
    scalars = ("miou", "acc", "final_train_loss")
    assert [second["metrics"][k] for k in scalars] == pytest.approx([fresh["metrics"][k] for k in scalars], rel=1e-6)
    assert second["metrics"]["per_class_iou"] == pytest.approx(fresh["metrics"]["per_class_iou"], rel=1e-6)
    assert second["metrics"]["miou"] != pytest.approx(first["metrics"]["miou"], rel=1e-3)


def test_features_are_keyed_by_backbone_identity_and_dataset_identity(tmp_path, other_demo_weights):
    cfg = to_container(compose(TINY))
    demo = build_backbone(cfg["backbone"])
    other = build_backbone({**cfg["backbone"], "weights": str(other_demo_weights)})
    assert demo.identity != other.identity == backbone_identity({**cfg["backbone"], "weights": str(other_demo_weights)})
    train, _ = build_datasets(cfg["dataset"])
    reseeded, _ = build_datasets({**cfg["dataset"], "seed": 5})    # same item names, other images
    item, item5 = train[0], reseeded[0]
    assert item["id"] == item5["id"] and item["source"] != item5["source"]
    assert item["source"] == dataset_identity({k: v for k, v in cfg["dataset"].items()}, "train")
    cache = FeatureCache(directory=str(tmp_path / "cache"))
    up = torch.nn.Identity()
    up.image_mean, up.image_std = (0.5,) * 3, (0.5,) * 3
    a = Pipeline(demo, up, torch.device("cpu"), cache).item_features(item)[0]
    b = Pipeline(other, up, torch.device("cpu"), cache).item_features(item)[0]
    c = Pipeline(demo, up, torch.device("cpu"), cache).item_features(item5)[0]
    assert cache.misses == 3 and cache.hits == 0
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # the same backbone and item again: a hit, also from a fresh process's view of the disk cache
    again = FeatureCache(directory=str(tmp_path / "cache"))
    assert torch.equal(Pipeline(demo, up, torch.device("cpu"), again).item_features(item)[0], a)
    assert again.hits == 1 and again.misses == 0


def test_a_corrupt_cache_file_is_recomputed(tmp_path):
    cache = FeatureCache(directory=str(tmp_path))
    value = (torch.ones(2), torch.zeros(1))
    cache.get(("k",), lambda: value)
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"not a tensor file")
    fresh = FeatureCache(directory=str(tmp_path))
    got = fresh.get(("k",), lambda: (torch.full((2,), 3.0), torch.zeros(1)))
    assert torch.equal(got[0], torch.full((2,), 3.0)) and fresh.misses == 1


class _WrongSize(torch.nn.Module):
    image_mean, image_std = (0.0,) * 3, (1.0,) * 3

    def forward(self, image, features, output_size):
        return features


def test_the_output_size_contract_is_enforced_and_calls_are_timed():
    bb = build_backbone({"kind": "demo", "name": "demo"})
    pipe = Pipeline(bb, _WrongSize(), torch.device("cpu"))
    with pytest.raises(UpbenchError, match="output-size contract"):
        pipe.upsample(torch.rand(1, 3, 32, 32), torch.randn(1, 112, 2, 2), (32, 32))
    from upbench.registry import UPSAMPLERS

    pipe = Pipeline(bb, UPSAMPLERS.create("bilinear"), torch.device("cpu"))
    out = pipe.upsample(torch.rand(2, 3, 32, 32), torch.randn(2, 112, 2, 2), (32, 40))
    assert out.shape == (2, 112, 32, 40)
    assert len(pipe.upsampler_s) == 1 and pipe.timing()["upsampler_ms"] > 0


def test_timing_synchronises_the_device_it_runs_on(monkeypatch):
    """Every timed section waits for its own device (cuda:1 included) before reading the clock."""
    from upbench import timing

    seen = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: seen.append(str(device)))
    with timing.Stopwatch("cuda:1"):
        pass
    with timing.Stopwatch("cpu"):
        pass
    assert seen == ["cuda:1", "cuda:1"]


# ------------------------------------------------------------------------------------------------ loading and device
def _identity():
    up = torch.nn.Identity()
    up.image_mean, up.image_std = (0.5,) * 3, (0.5,) * 3
    return up


def test_loader_workers_give_the_same_items_in_the_same_order():
    """Items through DataLoader worker processes arrive exactly as indexing gives them, in the batches' order."""
    cfg = to_container(compose([*TINY, "dataset.num_images=8"]))
    train, _ = build_datasets(cfg["dataset"])
    bb = build_backbone(cfg["backbone"])
    assert len(train) >= 5
    batches = [[3, 0], [2], [1, 4]]
    direct = Pipeline(bb, _identity(), torch.device("cpu"))
    workers = Pipeline(bb, _identity(), torch.device("cpu"), loader={"workers": 2})
    assert (direct.workers, workers.workers, workers.pin_memory) == (0, 2, False)   # never pinned without a GPU
    got = list(workers.loader(train, batches))
    assert [[it["id"] for it in b] for b in got] == [[train[i]["id"] for i in b] for b in batches]
    for b, idx in zip(got, batches):
        for it, i in zip(b, idx):
            assert torch.equal(it["image"], train[i]["image"]) and torch.equal(it["label"], train[i]["label"])
    assert [it["id"] for it in workers.items(train)] == [train[i]["id"] for i in range(len(train))]


def test_the_probe_trains_the_same_through_loader_workers():
    from upbench.tasks._probe import train_probe

    data = [{"x": torch.full((2,), float(i)), "y": torch.tensor(float(i % 3))} for i in range(10)]
    pipe = Pipeline(build_backbone({"kind": "demo", "name": "demo"}), _identity(), torch.device("cpu"),
                    loader={"workers": 2})
    cfg = {"lr": 0.05, "epochs": 3, "batch_size": 4, "lr_schedule": "per_epoch", "flip": True}

    def run(loader):
        torch.manual_seed(0)
        lin = torch.nn.Linear(2, 1)

        def loss(items, flips, _step):
            x = torch.stack([it["x"] * (-1 if f else 1) for it, f in zip(items, flips)])
            return ((lin(x)[:, 0] - torch.stack([it["y"] for it in items])) ** 2).mean()

        _, losses = train_probe(data, cfg, lin.parameters(), 0, loss, log=lambda _m: None, loader=loader)
        return list(losses), [p.detach().clone() for p in lin.parameters()]

    plain, workers = run(None), run(pipe.loader)
    assert plain[0] == workers[0] and all(torch.equal(a, b) for a, b in zip(plain[1], workers[1]))


def test_features_stay_on_the_device_within_the_budget():
    """Backbone features are kept on the job's device up to ``loader.device_features_gb`` (later epochs copy nothing
    from the host); beyond it they come from the host cache every time."""
    cfg = to_container(compose(TINY))
    train, _ = build_datasets(cfg["dataset"])
    bb = build_backbone(cfg["backbone"])
    up = _identity()
    one = Pipeline(bb, up, torch.device("cpu"), FeatureCache()).item_features(train[0])
    per_item = sum(t.numel() * t.element_size() for t in one)
    pipe = Pipeline(bb, up, torch.device("cpu"), FeatureCache(), loader={"device_features_gb": 2.5 * per_item / 2 ** 30})
    first = [pipe.item_features(train[i]) for i in range(4)]
    assert len(pipe._on_device) == 2 and pipe._on_device_bytes == 2 * per_item
    assert pipe.item_features(train[0])[0] is first[0][0] and torch.equal(first[0][0], one[0])
    none = Pipeline(bb, up, torch.device("cpu"), FeatureCache(enabled=False), loader={"device_features_gb": 10})
    none.item_features(train[0])
    assert not none._on_device   # no cache, nothing kept


@pytest.mark.parametrize("loader,needle", [({"workers": -1}, "loader.workers=-1"),
                                           ({"pin_memory": "yes"}, "loader.pin_memory=yes"),
                                           ({"device_features_gb": "lots"}, "loader.device_features_gb=lots")])
def test_bad_loader_settings_are_one_line_errors(loader, needle):
    with pytest.raises(UpbenchError, match=needle):
        Pipeline(build_backbone({"kind": "demo", "name": "demo"}), _identity(), torch.device("cpu"), loader=loader)


def test_loader_settings_do_not_change_a_run_key():
    from upbench.results import config_hash

    cfg = to_container(compose(TINY))
    assert config_hash(cfg) == config_hash({**cfg, "loader": {"workers": 7, "pin_memory": True}})
