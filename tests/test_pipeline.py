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
