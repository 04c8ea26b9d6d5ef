"""Depth datasets: the common item format, loaders for real layouts, and an embedded procedural set.

Items: ``{"image": (3,S,S) float in [0,1], "depth": (S,S) float32 (0 = no ground truth), "id": str}``.
Images get the JAFAR transform (short side -> S, centre crop).  Ground truth gets the same geometry: ``nearest``
for sparse / real depth (holes stay holes), bilinear for dense pseudo ground truth."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from upbench.errors import UpbenchError
from upbench.files import atomic_write
from upbench.registry import DATASETS

from .base import (UNREADABLE, GeneratedItems, list_images, load_image, missing_data, resize_center_crop_image,
                   short_side_crop_box, unreadable)
from .demo import skimage_texture

MAX_DEPTH = 10.0


def resize_center_crop_depth(depth: np.ndarray, size: int, mode: str = "nearest") -> torch.Tensor:
    """(H, W) float -> (size, size): short side -> ``size`` then centre crop, like the image transform."""
    t = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]
    nh, nw, top, left = short_side_crop_box(*t.shape[-2:], size)
    if mode == "nearest":
        t = F.interpolate(t, size=(nh, nw), mode="nearest-exact")
    else:
        valid = (t > 0).float()
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        t = t * (F.interpolate(valid, size=(nh, nw), mode="nearest-exact") > 0)
    return t[0, 0, top:top + size, left:left + size].contiguous()


def scale_to_range(depth: np.ndarray, how: Optional[str]) -> np.ndarray:
    """Relative (pseudo) depth has no metric scale: ``max`` maps each map's largest valid value to MAX_DEPTH,
    so it falls in the probe's bin range; ``None`` keeps the values."""
    if not how or how == "none":
        return depth
    if how != "max":
        raise UpbenchError(f"unknown depth scale '{how}'; valid: none, max")
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros_like(depth, dtype=np.float32)
    if valid.any():
        out[valid] = depth[valid] / depth[valid].max() * MAX_DEPTH
    return out


class DepthDataset(torch.utils.data.Dataset):
    """Pairs of (image path, depth reader); subclasses say how ground truth is read and resized."""

    name = "depth"
    kind = "depth"
    gt_resize = "nearest"

    def __init__(self, items: Sequence[Tuple[str, Callable[[], np.ndarray]]], img_size: int = 448,
                 scale: Optional[str] = None):
        self.items = list(items)
        self.img_size = int(img_size)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        img_path, read_depth = self.items[i]
        gt_path = getattr(read_depth, "path", img_path)
        try:
            raw = np.asarray(read_depth())
        except UNREADABLE as exc:
            raise unreadable(gt_path, exc, "depth map") from None
        if raw.ndim != 2 or raw.dtype.kind not in "iuf":
            raise UpbenchError(f"{gt_path}: a depth map must be a 2-D array of numbers (got {raw.dtype} {raw.shape}); "
                               "replace or remove the file")
        depth = scale_to_range(raw.astype(np.float32), self.scale)
        depth[~np.isfinite(depth)] = 0.0
        image, _ = load_image(img_path, self.img_size)
        return {"image": image, "depth": resize_center_crop_depth(depth, self.img_size, self.gt_resize),
                "id": Path(img_path).stem}


def _reader(path: str, read: Callable[[str], np.ndarray]) -> Callable[[], np.ndarray]:
    """A ground-truth reader that knows its file (named in errors)."""
    def run() -> np.ndarray:
        return read(path)
    run.path = path   # type: ignore[attr-defined]
    return run


def _npy(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)   # object arrays (pickles) are refused, never loaded


def _png_depth(path: str, divisor: float) -> Callable[[], np.ndarray]:
    def read(p: str) -> np.ndarray:
        with Image.open(p) as img:
            return np.asarray(img, dtype=np.float32) / divisor
    return _reader(path, read)


def _rgba_float_depth(path: str) -> Callable[[], np.ndarray]:
    """PNG whose RGBA bytes are a float32 map (how the MiDaS pseudo ground truth is stored)."""
    def read(p: str) -> np.ndarray:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("RGBA"))
        return np.ascontiguousarray(arr).view(np.float32).reshape(arr.shape[0], arr.shape[1]).copy()
    return _reader(path, read)


@DATASETS.register("nyuv2")
class NYUv2(DepthDataset):
    """NYU Depth v2 with real metric ground truth (uint16 PNG, millimetres; 0 = missing).

    Layouts: the BTS/Probe3D ``official_splits/{train,test}/<scene>/rgb_XXXXX.jpg`` + ``sync_depth_XXXXX.png``, or
    flat ``images/<id>.jpg`` + ``annotations/<id>.png`` (one folder serves every split)."""

    name = "nyuv2"

    def __init__(self, root: str, split: str = "train", img_size: int = 448, depth_divisor: float = 1000.0, **_):
        base = Path(os.path.expanduser(str(root)))
        items = []
        split_dir = base / "official_splits" / ("test" if split in ("val", "test") else "train")
        for rgb in list_images(split_dir, recursive=True):
            if rgb.name.startswith("rgb_"):
                gt = rgb.with_name("sync_depth_" + rgb.stem[4:] + ".png")
                if gt.exists():
                    items.append((str(rgb), _png_depth(str(gt), depth_divisor)))
        if not items:
            for img in list_images(base / "images", recursive=True):
                gt = base / "annotations" / (img.stem + ".png")
                if gt.exists():
                    items.append((str(img), _png_depth(str(gt), depth_divisor)))
        if not items:
            raise missing_data("nyuv2", str(root), "official_splits/{train,test}/<scene>/rgb_*.jpg + sync_depth_*.png "
                               "or images/*.jpg + annotations/*.png (uint16 mm)",
                               "the BTS NYUv2 release (github.com/cleinc/bts)")
        super().__init__(items, img_size)


@DATASETS.register("depth_folder")
class DepthFolder(DepthDataset):
    """Images with pseudo ground truth from a monocular model, e.g. MiDaS / Depth-Anything maps: ``images/**``
    plus ``<depth_dir>/**`` with the same relative path and a ``.png`` (float32 RGBA bytes) or ``.npy`` file.
    ``scale=max`` (default) maps each relative map into the probe's bin range."""

    name = "depth_folder"
    gt_resize = "bilinear"

    def __init__(self, root: str, split: str = "val", img_size: int = 448, depth_dir: str = "depth_rgba_float32",
                 scale: Optional[str] = "max", **_):
        base = Path(os.path.expanduser(str(root)))
        items = []
        for img in list_images(base / "images", recursive=True):
            rel = img.relative_to(base / "images").with_suffix("")
            png, npy = base / depth_dir / (str(rel) + ".png"), base / depth_dir / (str(rel) + ".npy")
            if png.exists():
                items.append((str(img), _rgba_float_depth(str(png))))
            elif npy.exists():
                items.append((str(img), _reader(str(npy), _npy)))
        if not items:
            raise missing_data("depth_folder", str(root), f"images/**/<id>.jpg + {depth_dir}/**/<id>.png|.npy",
                               "any image folder with precomputed relative depth")
        super().__init__(items, img_size, scale)


@DATASETS.register("middlebury")
class Middlebury(DepthDataset):
    """Middlebury 2014 stereo scenes: ``<scene>_left.png`` + ``<scene>_disp.npz`` (ground-truth disparity, inf =
    unknown).  Depth is inverse disparity (up to the unknown focal length x baseline), scaled into the bin range."""

    name = "middlebury"

    def __init__(self, root: str, split: str = "val", img_size: int = 448, **_):
        base = Path(os.path.expanduser(str(root)))
        items = []
        for left in sorted(base.glob("*_left.png")):
            disp = left.with_name(left.name.replace("_left.png", "_disp.npz"))
            if disp.exists():
                items.append((str(left), _reader(str(disp), lambda p: _inverse_disparity(np.load(p)["arr_0"]))))
        if not items:
            raise missing_data("middlebury", str(root), "<scene>_left.png + <scene>_disp.npz",
                               "vision.middlebury.edu/stereo/data/scenes2014")
        super().__init__(items, img_size, scale="max")


def _inverse_disparity(disp: np.ndarray) -> np.ndarray:
    out = np.zeros_like(disp, dtype=np.float32)
    ok = np.isfinite(disp) & (disp > 0)
    out[ok] = 1.0 / disp[ok]
    return out


PSEUDO_PROTOCOLS = ("full_image", "jafar")


@DATASETS.register("coco_depth")
class CocoPseudoDepth(DepthDataset):
    """COCO images with pseudo ground truth from Depth-Anything-V2-Small (the JAFAR depth protocol), computed once
    with ``transformers`` and cached as ``.npy`` under ``cache_dir``.  The model's output is relative and
    disparity-like (larger = nearer), used as is, as in the JAFAR suite.

    ``pseudo_protocol``: ``full_image`` runs the model on the whole image and resizes / crops its map like the image
    (bilinear); ``jafar`` runs it as the JAFAR script does, on the probe's own input -- the centre crop at ``img_size``
    (and separately on its horizontal flip, the map a flipped training item uses), scaled to 0-255 and truncated
    to uint8 -- and resizes its output bilinearly to the crop.  Images: ``<split>2017/`` (or ``images/``), or the
    STEGO / JAFAR layout with its curated list (``dataset/images/<split>2017`` + ``curated/...``)."""

    name = "coco_depth"
    gt_resize = "bilinear"
    MODEL = "depth-anything/Depth-Anything-V2-Small-hf"

    def __init__(self, root: str, split: str = "val", img_size: int = 448, cache_dir: Optional[str] = None,
                 image_list: Optional[str] = "auto", pseudo_model: Optional[str] = None,
                 pseudo_protocol: str = "full_image", **_):
        from .base import read_id_list
        from .cocostuff import curated_list

        if pseudo_protocol not in PSEUDO_PROTOCOLS:
            raise UpbenchError(f"unknown dataset.pseudo_protocol '{pseudo_protocol}'; valid: "
                               f"{', '.join(PSEUDO_PROTOCOLS)}")
        self.pseudo_protocol = pseudo_protocol
        base = Path(os.path.expanduser(str(root)))
        self.model = pseudo_model or self.MODEL
        dirs = (f"dataset/images/{split}2017", f"{split}2017", split, "images", ".")
        found = (list_images(base / d, recursive=True) for d in dirs)
        images = next((imgs for imgs in found if imgs), [])
        curated = curated_list(base, split) if image_list in (None, "auto") else None
        if curated is not None:
            images, kind = [p for p in images if p.stem in read_id_list(str(curated))], "curated"
        elif image_list not in (None, "auto", "all"):
            keep = read_id_list(image_list)
            images, kind = [p for p in images if p.stem in keep], f"list {Path(str(image_list)).name}"
        else:
            kind = "all"
        if not images:
            raise missing_data("coco_depth", str(root), f"{split}2017/*.jpg (or images/*.jpg)", "cocodataset.org")
        # maps from another model must never be mixed with the default model's cache
        default_cache = base / ("depth_anything_v2_small" if self.model == self.MODEL else
                                "pseudo_depth_" + "".join(c if c.isalnum() else "_" for c in self.model))
        cache = Path(os.path.expanduser(str(cache_dir or default_cache)))
        self.cache = cache
        items = [(str(p), lambda p=p: self._pseudo(p, cache)) for p in images]
        super().__init__(items, img_size)
        self.flags = {"image_list": kind, "pseudo_protocol": pseudo_protocol}

    def __getitem__(self, i: int) -> Dict[str, object]:
        if self.pseudo_protocol == "full_image":
            return super().__getitem__(i)
        img_path, _ = self.items[i]
        with Image.open(img_path) as img:
            image = resize_center_crop_image(img, self.img_size)
        stem = Path(img_path).stem
        return {"image": image, "id": stem, "depth": self._pseudo_crop(image, stem, False),
                "depth_flip": self._pseudo_crop(image.flip(-1), stem, True)}

    def _pseudo_crop(self, image01: torch.Tensor, stem: str, flipped: bool) -> torch.Tensor:
        """The JAFAR script's pseudo depth of a probe input (3, S, S) in [0, 1]: x255 truncated to uint8, the model,
        its output resized bilinearly (align_corners=False) to S x S."""
        path = self.cache / f"jafar_{self.img_size}" / f"{stem}{'_flip' if flipped else ''}.npy"
        if not path.exists():
            model, processor = _depth_anything(self.model)
            pixels = (255 * image01.permute(1, 2, 0).numpy()).astype(np.uint8)   # truncation, as the script does
            with torch.inference_mode():
                pred = model(**processor(images=pixels, return_tensors="pt")).predicted_depth
            pred = F.interpolate(pred[:, None], size=tuple(image01.shape[-2:]), mode="bilinear",
                                 align_corners=False)[0, 0]
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, pred.numpy().astype(np.float32))
        return torch.from_numpy(np.load(path))

    def _pseudo(self, image: Path, cache: Path) -> np.ndarray:
        path = cache / (image.stem + ".npy")
        if not path.exists():
            model, processor = _depth_anything(self.model)
            with Image.open(image) as img:
                rgb = img.convert("RGB")
                with torch.inference_mode():
                    pred = model(**processor(images=rgb, return_tensors="pt")).predicted_depth
                pred = F.interpolate(pred[:, None], size=(rgb.height, rgb.width), mode="bilinear",
                                     align_corners=False)[0, 0]
            with atomic_write(path) as tmp, open(tmp, "wb") as fh:   # a file object: np.save adds no suffix
                np.save(fh, pred.numpy().astype(np.float32))
        return np.load(path)


@lru_cache(maxsize=1)
def _depth_anything(name: str):
    try:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    except ImportError:
        raise UpbenchError("coco_depth pseudo ground truth needs transformers: pip install 'upbench[depth]'") from None
    try:
        return (AutoModelForDepthEstimation.from_pretrained(name).eval(), AutoImageProcessor.from_pretrained(name))
    except Exception as exc:  # offline / hub errors
        raise UpbenchError(f"could not load {name} for the pseudo depth ground truth ({type(exc).__name__}); "
                           f"offline? download it once (huggingface-cli download {name}) or point "
                           f"dataset.cache_dir at precomputed .npy maps") from None


# ----------------------------------------------------------------------------------------------------------------
# the embedded procedural set
# ----------------------------------------------------------------------------------------------------------------
TEXTURES = ("grass", "gravel", "brick", "coffee", "chelsea", "rocket", "astronaut", "hubble_deep_field")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@lru_cache(maxsize=None)
def _texture(source: str) -> np.ndarray:
    return skimage_texture(source).astype(np.float32) / 255.0


def _sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = tex.shape[:2]
    return tex[(np.floor(v * h).astype(np.int64) % h), (np.floor(u * w).astype(np.int64) % w)]


def render_scene(seed: int, split: str, index: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """A ray-cast scene with exact z-depth: a textured floor and back wall and 2-5 textured spheres, pinhole camera
    at the origin looking along +z, Lambertian shading.  Returns (image (S,S,3) in [0,1], depth (S,S) in metres)."""
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])
    f = size * rng.uniform(0.9, 1.3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = (xx - size / 2) / f, (size / 2 - yy) / f  # ray (dx, dy, 1): the hit parameter t is the z-depth
    floor_y, wall_z = -rng.uniform(0.8, 1.6), rng.uniform(6.0, 9.5)
    light = np.array([rng.uniform(-0.6, 0.6), 1.0, -rng.uniform(0.3, 1.0)])
    light /= np.linalg.norm(light)
    tex = [TEXTURES[k] for k in rng.permutation(len(TEXTURES))]
    depth = np.full((size, size), wall_z)  # the back wall
    image = _sample(_texture(tex[0]), dx * wall_z / 4, dy * wall_z / 4) * (0.55 + 0.45 * max(0.0, -light[2]))
    t_floor = np.where(dy < 0, floor_y / np.minimum(dy, -1e-9), np.inf)
    hit = t_floor < depth
    depth = np.where(hit, t_floor, depth)
    shade_floor = 0.55 + 0.45 * max(0.0, light[1])
    tf = np.where(hit, t_floor, 0.0)  # finite everywhere (misses are masked out below)
    floor_rgb = _sample(_texture(tex[1]), dx * tf / 3, tf / 3) * shade_floor
    image = np.where(hit[..., None], floor_rgb, image)
    for k in range(int(rng.integers(2, 6))):
        r = rng.uniform(0.3, 1.1)
        c = np.array([rng.uniform(-2.5, 2.5), 0.0, rng.uniform(2.0, wall_z - 1.2)])
        c[1] = floor_y + r if rng.random() < 0.7 else rng.uniform(floor_y + r, 1.5)
        a = dx * dx + dy * dy + 1.0
        b = dx * c[0] + dy * c[1] + c[2]
        disc = b * b - a * (c @ c - r * r)
        t = np.where(disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
        hit = (t > 0) & (t < depth)
        if not hit.any():
            continue
        t = np.where(hit, t, c[2])  # finite everywhere (misses are masked out below)
        px, py, pz = dx * t - c[0], dy * t - c[1], t - c[2]
        n = np.stack([px, py, pz], -1) / r
        shade = 0.35 + 0.65 * np.clip(n @ light, 0, None)
        u = np.arctan2(px, -pz) / (2 * np.pi) + 0.5
        v = np.arccos(np.clip(py / r, -1, 1)) / np.pi
        rgb = _sample(_texture(tex[2 + k % (len(tex) - 2)]), u * 2, v) * shade[..., None]
        depth = np.where(hit, t, depth)
        image = np.where(hit[..., None], rgb, image)
    return np.clip(image, 0, 1).astype(np.float32), np.minimum(depth, MAX_DEPTH).astype(np.float32)


def scene_focal(seed: int, split: str, index: int, size: int) -> float:
    """The focal length (px) :func:`render_scene` drew for a scene: the first draw of the same stream (tasks that
    derive surface normals from depth need the camera)."""
    return float(size * np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index]).uniform(0.9, 1.3))


@DATASETS.register("demo_depth")
class DemoDepth(GeneratedItems, DepthDataset):
    """Embedded depth set, no download: ray-cast scenes of scikit-image textures with exact depth (metres)."""

    name = "demo_depth"

    def __init__(self, split: str = "train", img_size: int = 192, num_images: int = 24, seed: int = 0, **_):
        super().__init__([], img_size)
        self.split, self.seed, self.num_images = split, int(seed), int(num_images)

    def make(self, i: int) -> Dict[str, object]:
        image, depth = render_scene(self.seed, self.split, i, self.img_size)
        return {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "depth": torch.from_numpy(depth),
                "id": f"demo_depth_{self.split}_{i:04d}",
                "focal_px": scene_focal(self.seed, self.split, i, self.img_size)}
