"""Unlabelled training images for self-supervised upsampler training (``upbench train``): square crops in [0, 1] at
``img_size`` from an image folder (recursive) or ``builtin:skimage`` (photos that ship inside scikit-image)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from upbench.errors import UpbenchError
from upbench.registry import DATASETS
from upbench.transforms import resize

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "grass", "gravel", "brick", "camera", "moon", "coins", "page")


@DATASETS.register("train_images")
class TrainImages(torch.utils.data.Dataset):
    """Items are (3, S, S) tensors.  ``resize``: ``short_side_crop`` (centre square, or with ``crops_per_image`` > 1
    that many deterministic random squares between half and all of the short side) or ``square`` (the whole image
    squeezed, the official ImageNet route)."""

    name = "train_images"
    kind = "train_images"

    def __init__(self, root: str, img_size: int, resize: str = "short_side_crop", crops_per_image: int = 1,
                 limit: Optional[int] = None, seed: int = 0, **_: Any):
        self.img_size, self.resize, self.crops = int(img_size), resize, max(1, int(crops_per_image))
        if resize not in ("short_side_crop", "square"):
            raise UpbenchError(f"unknown data.resize '{resize}'; valid: short_side_crop, square")
        if str(root).startswith("builtin:"):
            name = str(root).split(":", 1)[1]
            if name != "skimage":
                raise UpbenchError(f"unknown builtin image set '{name}'; valid: builtin:skimage")
            self.sources: List[Any] = list(SKIMAGE_PHOTOS)
        else:
            folder = Path(os.path.expanduser(str(root)))
            self.sources = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
            if not self.sources:
                raise UpbenchError(f"no images (jpg/png/...) found under data.root={root}; point it at an image folder")
        self.sources = self.sources[: limit or None]
        rng = np.random.default_rng(seed)
        # (source index, crop box as fractions) -- fixed once, so features can be cached and resumes are exact
        self.items = [(i, rng.uniform(size=3)) for i in range(len(self.sources)) for _ in range(self.crops)]
        self._cache: Dict[int, np.ndarray] = {}

    def _load(self, i: int) -> np.ndarray:
        if i not in self._cache:
            src = self.sources[i]
            if src in SKIMAGE_PHOTOS:
                from skimage import data

                arr = getattr(data, src)()
            else:
                from PIL import Image

                with Image.open(src) as im:
                    arr = np.asarray(im.convert("RGB"))
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            self._cache[i] = np.ascontiguousarray(arr[..., :3])
        return self._cache[i]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        src, (fs, fy, fx) = self.items[index]
        img = torch.from_numpy(self._load(src)).permute(2, 0, 1)[None].float() / 255.0
        H, W = img.shape[-2:]
        S = self.img_size
        if self.resize == "square" and self.crops == 1:
            return resize(img, (S, S), antialias=True)[0]
        side = min(H, W)
        if self.crops > 1:  # random square crop between half and all of the short side
            side = int(side * (0.5 + 0.5 * fs))
        y, x = int((H - side) * (fy if self.crops > 1 else 0.5)), int((W - side) * (fx if self.crops > 1 else 0.5))
        return resize(img[..., y:y + side, x:x + side], (S, S), antialias=True)[0]
