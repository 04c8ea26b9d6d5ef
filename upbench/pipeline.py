"""The one data path every job takes, owned by the core:

    image -> backbone (frozen) -> features (cached) -> upsampler(image, features, output_size) -> task

:class:`Pipeline` does normalisation (the backbone's statistics for the backbone, the upsampler's -- or the
backbone's, ``guidance_norm`` -- for the guidance image), the feature cache (keyed by the backbone's identity: a hash
of its full config, weight files included; the dataset's identity; the item; size and flip), the output-size
contract, and device-synchronised timing of every upsampler call.  Tasks receive one and never re-implement any of
it.  The builders here turn config sections into plugins, through the registries only."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .cache import PROCESS_CACHE, FeatureCache
from .dtypes import reduced_dtype
from .errors import UpbenchError
from .registry import BACKBONES, DATASETS, UPSAMPLERS
from .results import config_hash
from .timing import Stopwatch, median_ms
from .transforms import normalize, resize

#: keys of a backbone config that declare facts about it (checked against the built model), not constructor arguments
DECLARED = ("channels", "patch_size")
#: keys of a dataset config that choose items or splits, not what an item is
DATASET_SELECTION = ("train_split", "val_split", "limit_train", "limit_val", "num_images", "num_classes")


# ---------------------------------------------------------------------------------------------------- identities
def _file_stamp(value: Any) -> Any:
    """A local weight file stands for its contents: (path, size, mtime), so replacing it changes the identity."""
    if isinstance(value, str) and value and os.path.isfile(os.path.expanduser(value)):
        st = os.stat(os.path.expanduser(value))
        return [value, st.st_size, int(st.st_mtime)]
    return value


def backbone_identity(cfg: Mapping[str, Any]) -> str:
    """Hash of a backbone's full config (its weights included); two backbones with equal identities compute equal
    features."""
    return config_hash({k: _file_stamp(v) for k, v in cfg.items()}, exclude=())


def dataset_identity(cfg: Mapping[str, Any], split: str) -> str:
    """Hash of what decides a dataset item's image (name, root, size, seed, layout options) and the split."""
    return config_hash({**{k: v for k, v in cfg.items() if k not in DATASET_SELECTION}, "split": split}, exclude=())


# ---------------------------------------------------------------------------------------------------- builders
def build_backbone(cfg: Mapping[str, Any]):
    """Build from a backbone config: ``{kind, name, ...}`` through :data:`BACKBONES`; declared ``channels`` /
    ``patch_size`` must match the model."""
    declared = {k: cfg.get(k) for k in DECLARED}
    spec = {k: v for k, v in cfg.items() if k not in DECLARED}
    kind = spec.pop("kind", "timm_vit")
    model = BACKBONES.create(kind, **{k: v for k, v in spec.items() if v is not None or k == "weights"})
    for key, value in declared.items():
        if value is not None and int(value) != int(getattr(model, key)):
            raise UpbenchError(f"backbone '{model.name}' has {key}={getattr(model, key)}, its config declares "
                               f"{value}; fix backbone.{key}")
    model.identity = backbone_identity(cfg)
    return model


_BACKBONES: Dict[str, Any] = {}


def get_backbone(cfg: Mapping[str, Any], device: torch.device):
    """Backbones are frozen and stateless: one instance per process, config and device."""
    key = json.dumps(cfg, sort_keys=True, default=str) + str(device)
    if key not in _BACKBONES:
        _BACKBONES[key] = build_backbone(cfg).to(device)
    return _BACKBONES[key]


def backbone_shape(cfg: Mapping[str, Any]) -> Tuple[int, int]:
    """(channels, patch_size) of a backbone config without its weights: the declared ``channels`` / ``patch_size``
    when present, else read off a random-init instance of the same architecture."""
    channels, patch = cfg.get("channels"), cfg.get("patch_size")
    if channels and patch:
        return int(channels), int(patch)
    spec = {k: v for k, v in cfg.items() if k not in DECLARED}
    if "pretrained" in spec or "weights" in spec:   # the architecture is enough
        spec.update(pretrained=False, weights=None)
    model = build_backbone(spec)
    return int(channels or model.channels), int(patch or model.patch_size)


def build_upsampler(cfg: Mapping[str, Any], backbone, device: torch.device, trainable: bool = False):
    """The configured upsampler for ``backbone``'s features (channels and patch size come from the backbone),
    official weights loaded, on ``device``; frozen unless ``trainable``."""
    kwargs = dict(cfg.get("kwargs") or {})
    for key in ("in_channels", "patch_size"):
        if key in kwargs:
            raise UpbenchError(f"upsampler.kwargs.{key} is taken from the backbone; remove it from the upsampler config")
    model = UPSAMPLERS.create(cfg["name"], in_channels=backbone.channels, patch_size=backbone.patch_size, **kwargs)
    if cfg.get("weights"):
        model.load_official(str(cfg["weights"]))
    model = model.to(device)
    return model.train().requires_grad_(True) if trainable else model.eval().requires_grad_(False)


class SliceView(torch.utils.data.Dataset):
    """``split[a:b]``: a contiguous part of a split (e.g. to probe on part of a small folder and test on the rest)."""

    def __init__(self, base: Any, indices: range):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)


class Identified(SliceView):
    """A dataset whose dict items carry ``source``: the dataset's identity, part of every feature-cache key."""

    def __init__(self, base: Any, identity: str):
        super().__init__(base, range(len(base)))
        self.identity = identity

    def __getitem__(self, i: int) -> Any:
        item = self.base[i]
        return {**item, "source": self.identity} if isinstance(item, dict) else item


def _split(spec: str, key: str) -> Tuple[str, Optional[slice]]:
    """``"val"`` -> ("val", None); ``"val[10:]"`` -> ("val", slice(10, None))."""
    if "[" not in spec:
        return spec, None
    name, rest = spec.split("[", 1)
    try:
        a, b = rest.rstrip("]").split(":")
        return name, slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise UpbenchError(f"dataset.{key}={spec}: use name or name[start:stop], e.g. val[:20]") from None


def _positive_int(value: Any, key: str, optional: bool) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UpbenchError(f"{key}={value}: expected a positive integer" + (" or null (no limit)" if optional else ""))
    return value


def _source_files(ds: Any) -> Optional[set]:
    """The image files a (sliced) dataset reads, or None when its items are not files (generated sets)."""
    positions = range(len(ds))
    while isinstance(ds, SliceView):
        positions = [ds.indices[p] for p in positions]
        ds = ds.base
    entries = getattr(ds, "pairs", None) or getattr(ds, "items", None)
    if not isinstance(entries, list) or len(entries) != len(ds):
        return None
    out = set()
    for p in positions:
        key = entries[p][0] if isinstance(entries[p], (tuple, list)) else entries[p]
        if not isinstance(key, (str, os.PathLike)):
            return None
        out.add(os.path.realpath(str(key)))
    return out


def build_datasets(cfg: Mapping[str, Any], disjoint: bool = True) -> Tuple[Any, Any]:
    """(train, val) of a dataset config: ``train_split`` / ``val_split`` (``name`` or ``name[a:b]``), limits.

    Refused with one line: a size or limit that is not a positive integer, a split (or slice) with no image, and a
    train and val split that share images (``disjoint``: for tasks that fit on the train split; a flat folder has
    no split files, so both splits read the same images)."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    train_split, val_split = cfg.pop("train_split", "train"), cfg.pop("val_split", "val")
    limits = {"limit_train": cfg.pop("limit_train", None), "limit_val": cfg.pop("limit_val", None)}
    for key, value in limits.items():
        _positive_int(value, f"dataset.{key}", optional=True)
    if "img_size" in cfg:
        _positive_int(cfg["img_size"], "dataset.img_size", optional=False)
    cfg.pop("num_classes", None)
    out = []
    for key, spec, limit in (("train_split", train_split, limits["limit_train"]),
                             ("val_split", val_split, limits["limit_val"])):
        split, part = _split(str(spec), key)
        ds = Identified(DATASETS.create(name, split=split, **cfg), dataset_identity({"name": name, **cfg}, split))
        total = len(ds)
        if part is not None:
            ds = SliceView(ds, range(len(ds))[part])
        if limit:
            ds = SliceView(ds, range(min(int(limit), len(ds))))
        if len(ds) == 0:
            raise UpbenchError(f"dataset.{key}={spec} selects no image ({name} '{split}' has {total}); choose a "
                               f"non-empty split or slice, e.g. dataset.{key}='{split}[:{max(1, total // 2)}]'")
        out.append(ds)
    train, val = out
    shared = (_source_files(train) or set()) & (_source_files(val) or set()) if disjoint else set()
    if shared:
        n = len(_source_files(val) or ())
        raise UpbenchError(f"dataset {name}: the train and val splits share {len(shared)} of the {n} validation "
                           f"images (a folder without split files gives both splits the same images); split it, "
                           f"e.g. \"dataset.train_split='{val_split}[:{n // 2}]'\" "
                           f"\"dataset.val_split='{val_split}[{n // 2}:]'\"")
    return train, val


def build_images(cfg: Mapping[str, Any], seed: int = 0):
    """Training images of an ``upbench train`` ``data`` config (:data:`DATASETS` ``train_images``)."""
    spec = {k: v for k, v in cfg.items() if v is not None}
    ds = DATASETS.create("train_images", seed=seed, **spec)
    ds.identity = dataset_identity({"name": "train_images", **spec, "seed": seed}, "train")
    return ds


_DISK_CACHES: Dict[str, FeatureCache] = {}


def feature_cache(cache_cfg: Mapping[str, Any]) -> FeatureCache:
    """The process-wide in-memory cache, a persistent one under ``task.cache.dir``, or none."""
    if not cache_cfg.get("features", True):
        return FeatureCache(enabled=False)
    directory = cache_cfg.get("dir")
    if not directory:
        return PROCESS_CACHE
    return _DISK_CACHES.setdefault(str(directory), FeatureCache(directory=str(directory)))


# ---------------------------------------------------------------------------------------------------- the path
def check_output(out: torch.Tensor, features: torch.Tensor, output_size: Sequence[int]) -> None:
    """The contract every upsampler follows: exactly the features' batch and channels, at ``output_size``."""
    size = (int(output_size[0]), int(output_size[1]))
    if tuple(out.shape[:2]) != tuple(features.shape[:2]) or tuple(out.shape[-2:]) != size:
        raise UpbenchError(f"upsampler returned {tuple(out.shape)}, expected "
                           f"{(*features.shape[:2], *size)} (the output-size contract)")


def _as_list(items: List[Any]) -> List[Any]:
    return items   # a batch stays a list of item dicts: items differ in size, tasks stack what they need


def loader_settings(cfg: Optional[Mapping[str, Any]], device: torch.device) -> Tuple[int, bool, float]:
    """(workers, pin_memory, device feature budget in bytes) of the ``loader`` config section; ``auto``: on a GPU
    up to 8 worker processes (one core left to the main process), pinned memory, and up to a quarter of the free
    device memory for backbone features kept on the device; on a CPU none of these (the items load in the main
    process and the features already live in the device's memory)."""
    cfg = dict(cfg or {})
    gpu = torch.device(device).type == "cuda"
    workers = cfg.get("workers", "auto")
    if workers in (None, "auto"):
        workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if gpu else 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UpbenchError(f"loader.workers={workers}: expected an integer >= 0 or auto")
    pin = cfg.get("pin_memory", "auto")
    pin = gpu if pin in (None, "auto") else pin
    if not isinstance(pin, bool):
        raise UpbenchError(f"loader.pin_memory={pin}: expected true, false or auto")
    budget = cfg.get("device_features_gb", "auto")
    if budget in (None, "auto"):
        budget_bytes = 0.25 * torch.cuda.mem_get_info(torch.device(device))[0] if gpu else 0.0
    else:
        try:
            budget_bytes = float(budget) * 2 ** 30
        except (TypeError, ValueError):
            budget_bytes = -1.0
        if isinstance(budget, bool) or not budget_bytes >= 0:
            raise UpbenchError(f"loader.device_features_gb={budget}: expected a number of GB >= 0 or auto")
    return int(workers), bool(pin and gpu), float(budget_bytes)


INPUT_NORMS = ("normalised", "official_unnormalised")
RESIZE_AT = ("features", "logits", "labels")


class Pipeline:
    """``backbone``, ``upsampler`` on ``device``; ``cache``: backbone features; ``guidance_norm``: "upsampler" (each
    model gets its own normalisation) or "backbone" (the guidance image gets the backbone's, JAFAR's choice);
    ``input_norm``: "normalised", or "official_unnormalised" (backbone and upsampler both get [0, 1] images, as the
    JAFAR depth script feeds them); ``backbone_scale`` / ``feature_grid``: the backbone sees the image at this many
    times its side / at ``feature_grid`` x its patch size (arbitrary-scale evaluation, the 2x-input baseline);
    ``upsampled_budget_gb``: keep upsampled features of dataset items in memory up to this size;
    ``compute_dtype``: None (float32) or bf16 / fp16: the upsampler (and, through :meth:`autocast`, the task's probe)
    run under ``torch.autocast`` in it; results come back as float32; ``loader``: how dataset items are loaded
    (``workers`` background processes, ``pin_memory``) and how many bytes of backbone features stay on the device
    between epochs (``device_features_gb``), see :func:`loader_settings`."""

    def __init__(self, backbone, upsampler, device: torch.device, cache: Optional[FeatureCache] = None,
                 guidance_norm: str = "upsampler", upsampled_budget_gb: float = 0.0, input_norm: str = "normalised",
                 backbone_scale: float = 1.0, feature_grid: Optional[int] = None, compute_dtype: Any = None,
                 loader: Optional[Mapping[str, Any]] = None):
        self.backbone, self.upsampler, self.device = backbone, upsampler, torch.device(device)
        self.workers, self.pin_memory, self.device_budget = loader_settings(loader, self.device)
        self._on_device: Dict[Tuple[Any, ...], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._on_device_bytes = 0
        self.compute_dtype = reduced_dtype(compute_dtype)
        self.cache = cache if cache is not None else FeatureCache(enabled=False)
        if guidance_norm == "upsampler":
            self.guide_mean, self.guide_std = upsampler.image_mean, upsampler.image_std
        elif guidance_norm == "backbone":
            self.guide_mean, self.guide_std = backbone.mean, backbone.std
        else:
            raise UpbenchError(f"unknown guidance_norm '{guidance_norm}'; valid: upsampler, backbone")
        if input_norm not in INPUT_NORMS:
            raise UpbenchError(f"unknown task.input_norm '{input_norm}'; valid: {', '.join(INPUT_NORMS)}")
        self.input_norm = input_norm
        if float(backbone_scale) <= 0 or (feature_grid is not None and int(feature_grid) < 1):
            raise UpbenchError("task.backbone_scale must be > 0 and task.feature_grid >= 1")
        # an upsampler may itself be a backbone-side baseline (input2x: the backbone sees the image at 2x)
        self.backbone_scale = float(backbone_scale) * float(getattr(upsampler, "backbone_scale", 1.0))
        self.feature_grid = feature_grid
        self.budget_bytes = float(upsampled_budget_gb) * 2 ** 30
        self._hr: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self.backbone_s: List[float] = []
        self.upsampler_s: List[float] = []

    def autocast(self) -> Any:
        """``torch.autocast`` in ``compute_dtype`` on this device (a no-op context for float32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------ normalisation
    def backbone_side(self, side: int) -> int:
        """The side (px) the backbone sees for an image of ``side`` px."""
        if self.feature_grid:
            return int(self.feature_grid) * int(self.backbone.patch_size)
        return max(1, int(round(side * self.backbone_scale)))

    def backbone_input(self, image01: torch.Tensor) -> torch.Tensor:
        x = image01.to(self.device)
        H, W = x.shape[-2:]
        if self.feature_grid or self.backbone_scale != 1.0:
            x = resize(x, (self.backbone_side(H), self.backbone_side(W)), "bilinear", antialias=True)
        if self.input_norm == "official_unnormalised":
            return x
        return normalize(x, self.backbone.mean, self.backbone.std)

    def guidance(self, image01: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "official_unnormalised":
            return image01.to(self.device)
        return normalize(image01.to(self.device), self.guide_mean, self.guide_std)

    def native_size(self, feature_size: Sequence[int], output_size: Sequence[int]) -> Tuple[int, int]:
        """The size the upsampler produces by itself on its way to ``output_size`` (see
        ``Upsampler.native_output_size``)."""
        fn = getattr(self.upsampler, "native_output_size", None)
        size = fn(tuple(feature_size), tuple(output_size)) if fn else tuple(output_size)
        return (int(size[0]), int(size[1]))

    def probe_size(self, feature_size: Sequence[int], output_size: Sequence[int], resize_at: str) -> Tuple[int, int]:
        """The size a probe reads the features at: ``output_size`` when the adapter resizes the features
        (``resize_at=features``), else the upsampler's own size (the probe then resizes its logits / labels)."""
        if resize_at not in RESIZE_AT:
            raise UpbenchError(f"unknown task.resize_at '{resize_at}'; valid: {', '.join(RESIZE_AT)}")
        if resize_at == "features" and not getattr(self.upsampler, "always_native", False):
            return (int(output_size[0]), int(output_size[1]))
        return self.native_size(feature_size, output_size)

    # ------------------------------------------------------------------ backbone side
    def encode(self, image01: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of a batch (B, 3, H, W) in [0, 1], not cached: (B, C, h, w), (B, n, C) on the device."""
        with torch.inference_mode(), Stopwatch(self.device) as sw:
            out = self.backbone(self.backbone_input(image01))
        self.backbone_s.append(sw.seconds / max(1, image01.shape[0]))
        return out

    def encode_with_bias(self, image01: torch.Tensor, patch_bias: torch.Tensor,
                         grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of a batch whose patch embedding gets ``patch_bias`` added (the backbone's documented
        additive patch-token input, e.g. SimpleClick's click maps).  Never cached: the features depend on the bias,
        so the per-image feature cache (keyed by image only) must not hold them.  ``grad``: gradients flow through
        the frozen backbone to ``patch_bias`` (to train what produces it)."""
        if self.feature_grid or self.backbone_scale != 1.0:
            raise UpbenchError("a patch_bias needs the backbone to see the image at its own size; remove "
                               "task.backbone_scale / task.feature_grid (and use an upsampler other than input2x)")
        with (torch.enable_grad() if grad else torch.inference_mode()), Stopwatch(self.device) as sw:
            out = self.backbone(self.backbone_input(image01), patch_bias=patch_bias.to(self.device))
        self.backbone_s.append(sw.seconds / max(1, image01.shape[0]))
        return out

    def features(self, image01: torch.Tensor, key: Optional[Tuple[Any, ...]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features of one image (3, H, W) in [0, 1]: ((C, h, w), (n, C)) on the CPU, cached under ``key`` (which
        identifies the image; the backbone's identity is added here) when given."""
        def compute():
            feats, prefix = self.encode(image01[None])
            return feats[0], prefix[0]

        if key is None:
            return tuple(t.detach().cpu() for t in compute())  # type: ignore[return-value]
        setting = (self.input_norm, self.backbone_scale, self.feature_grid)   # what the backbone saw
        full_key = (self.backbone.identity, setting, *key)
        if full_key in self._on_device:
            return self._on_device[full_key]
        entry = self.cache.get(full_key, compute)
        size = sum(t.numel() * t.element_size() for t in entry)
        if self.cache.enabled and self._on_device_bytes + size <= self.device_budget:
            # kept on the device while within the budget: later epochs copy nothing from the host
            entry = tuple(t.to(self.device) for t in entry)  # type: ignore[assignment]
            self._on_device[full_key] = entry
            self._on_device_bytes += size
        return entry

    def item_features(self, item: Mapping[str, Any], flip: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached features of a dataset item (``{"image", "id", "source"}``), optionally flipped horizontally."""
        image = item["image"].flip(-1) if flip else item["image"]
        key = (item.get("source"), item["id"], tuple(image.shape[-2:]), bool(flip))
        return self.features(image, key)

    # ------------------------------------------------------------------ data
    def loader(self, dataset: Any, batches: Optional[Sequence[Sequence[int]]] = None) -> Iterator[List[Any]]:
        """The items of ``dataset`` as lists, one per entry of ``batches`` (lists of indices; default: every item
        alone, in order), loaded by ``workers`` background processes (``torch.utils.data.DataLoader``) and pinned
        for asynchronous copies when the job runs on a GPU.  The order is exactly ``batches``'."""
        batches = [list(b) for b in batches] if batches is not None else [[i] for i in range(len(dataset))]
        if not batches:
            return iter(())
        if self.workers == 0 and not self.pin_memory:
            return ([dataset[i] for i in b] for b in batches)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                                                collate_fn=_as_list, pin_memory=self.pin_memory))

    def items(self, dataset: Any) -> Iterator[Any]:
        """Every item of ``dataset`` in order, through :meth:`loader`."""
        for batch in self.loader(dataset):
            yield from batch

    # ------------------------------------------------------------------ upsampler side
    def upsample(self, image01: torch.Tensor, features: torch.Tensor, output_size: Sequence[int],
                 grad: bool = False) -> torch.Tensor:
        """``upsampler(guidance(image01), features, output_size)`` under inference mode, device-synchronised and
        timed (seconds per image); the result must have exactly the features' batch and channels and
        ``output_size``.  ``grad``: gradients flow through the frozen upsampler to ``features`` (for tasks that
        train what feeds the backbone, e.g. a click encoder)."""
        size = (int(output_size[0]), int(output_size[1]))
        features = features.to(self.device, non_blocking=True)
        with (torch.enable_grad() if grad else torch.inference_mode()):
            guide = self.guidance(image01)
            with Stopwatch(self.device) as sw, self.autocast():
                out = self.upsampler(guide, features, size)
            if self.compute_dtype is not None:
                out = out.to(features.dtype)
        self.upsampler_s.append(sw.seconds / max(1, features.shape[0]))
        check_output(out, features, size)
        return out

    def item_upsampled(self, item: Mapping[str, Any], flip: bool, output_size: Sequence[int]) -> torch.Tensor:
        """Upsampled features (C, H, W) float of a dataset item, kept in memory while within the budget."""
        size = (int(output_size[0]), int(output_size[1]))
        key = (item.get("source"), item["id"], bool(flip), size)
        if key in self._hr:
            return self._hr[key]
        feats, _ = self.item_features(item, flip)
        image = item["image"].flip(-1) if flip else item["image"]
        hr = self.upsample(image[None], feats[None], size)[0].float()
        used = sum(t.numel() * 4 for t in self._hr.values())
        if used + hr.numel() * 4 <= self.budget_bytes:
            self._hr[key] = hr
        return hr

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents back to [0, 1] images through a VAE backbone's decoder."""
        if not hasattr(self.backbone, "decode"):
            raise UpbenchError(f"backbone '{self.backbone.name}' has no decoder; use a VAE backbone (taef2, sd15_vae)")
        with torch.inference_mode():
            return self.backbone.decode(latents.to(self.device))

    def timing(self) -> Dict[str, Any]:
        """Median milliseconds per image of the upsampler and backbone calls made so far."""
        return {"upsampler_ms": median_ms(self.upsampler_s), "backbone_ms": median_ms(self.backbone_s),
                "upsampled_cached": bool(self._hr)}
