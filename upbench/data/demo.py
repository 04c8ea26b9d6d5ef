"""An embedded segmentation set that needs no download: collages of real photo textures that ship inside
scikit-image, labelled exactly.

Each image starts from one class's texture and receives 4-7 shapes (smooth random blobs and curved bands) cut
from the other classes' photos; the label of a pixel is the class of the texture painted there last, so the
ground truth is exact by construction.  Boundaries are curved and some shapes are thin (a few pixels to a few
patches wide), so an upsampler that follows image edges does better than blocky or blurry upsampling.
Deterministic: item ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])``."""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

from upbench.registry import DATASETS

from .base import GeneratedItems, SegDataset

CLASSES: List[Tuple[str, str]] = [  # (class name, skimage.data function)
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("brick", "brick"),
    ("fur", "chelsea"),
    ("coffee", "coffee"),
    ("stars", "hubble_deep_field"),
]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@lru_cache(maxsize=None)
def skimage_texture(source: str) -> np.ndarray:
    """An RGB uint8 photo that ships inside scikit-image (grey ones repeated to three channels)."""
    from skimage import data

    arr = getattr(data, source)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _texture_crop(rng: np.random.Generator, source: str, size: int) -> np.ndarray:
    tex = skimage_texture(source)
    h, w = tex.shape[:2]
    side = int(min(h, w) * rng.uniform(0.45, 0.9))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(tex[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out * rng.uniform(0.85, 1.15)


def _blob(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    r0 = rng.uniform(0.08, 0.3) * size
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(theta, r0)
    for k in range(2, 6):  # smooth radial wobble
        radius += r0 * rng.uniform(0.0, 0.25) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) < radius


def _band(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)   # along the band
    v = -np.sin(angle) * (xx - size / 2) + np.cos(angle) * (yy - size / 2)  # across the band
    centre = rng.uniform(-0.3, 0.3) * size + rng.uniform(0.03, 0.12) * size * np.sin(
        2 * np.pi * u / (size * rng.uniform(0.4, 1.2)) + rng.uniform(0, 2 * np.pi))
    half_width = rng.uniform(0.012, 0.06) * size
    return np.abs(v - centre) < half_width


def make_item(seed: int, split: str, index: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    background = int(rng.integers(len(CLASSES)))
    image = _texture_crop(rng, CLASSES[background][1], size)
    label = np.full((size, size), background, dtype=np.int64)
    for _ in range(int(rng.integers(4, 8))):
        cls = int(rng.integers(len(CLASSES)))
        mask = (_band if rng.random() < 0.35 else _blob)(rng, size, yy, xx)
        image = np.where(mask[..., None], _texture_crop(rng, CLASSES[cls][1], size), image)
        label[mask] = cls
    return np.clip(image, 0.0, 1.0), label


@DATASETS.register("demo")
class DemoSegmentation(GeneratedItems, SegDataset):
    name = "demo"
    num_classes = len(CLASSES)
    class_names = tuple(name for name, _ in CLASSES)

    def __init__(self, split: str = "train", img_size: int = 224, num_images: int = 32, seed: int = 0, **_):
        super().__init__([], img_size)
        self.split, self.seed = split, seed
        self.num_images = int(num_images)

    def make(self, i: int) -> Dict[str, object]:
        image, label = make_item(self.seed, self.split, i, self.img_size)
        return {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "label": torch.from_numpy(label),
                "id": f"demo_{self.split}_{i:04d}"}
