"""Image-only sets for the generative tasks: items ``{"image": (3,S,S) in [0,1], "id"}`` (JAFAR transform:
short side -> S, centre crop)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import torch
from PIL import Image

from upbench.registry import DATASETS

from .base import GeneratedItems, list_images, missing_data, resize_center_crop_image

DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


@DATASETS.register("image_folder")
class ImageFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursively, sorted), e.g. FacesHQ / CelebA-HQ or LHQ for super-resolution."""

    name = "image_folder"
    kind = "images"

    def __init__(self, root: str, split: str = "val", img_size: int = 1024, **_):
        base = Path(os.path.expanduser(str(root)))
        self.paths = list_images(base, recursive=True)
        if not self.paths:
            raise missing_data(self.name, str(root), "image files (any depth) under the root", "the dataset's release")
        self.img_size = int(img_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Dict[str, object]:
        with Image.open(self.paths[i]) as img:
            return {"image": resize_center_crop_image(img, self.img_size), "id": self.paths[i].stem}


@DATASETS.register("faceshq")
class FacesHQ(ImageFolder):
    """FacesHQ (CelebA-HQ + FFHQ) faces, the super-resolution set of UPLiFT Table 4."""

    name = "faceshq"


@DATASETS.register("lhq")
class LHQ(ImageFolder):
    """LHQ landscapes, the second super-resolution set of UPLiFT Table 4."""

    name = "lhq"


@DATASETS.register("demo_images")
class DemoImages(GeneratedItems, torch.utils.data.Dataset):
    """Photos that ship inside scikit-image (no download), centre-cropped to ``img_size``."""

    name = "demo_images"
    kind = "images"

    def __init__(self, split: str = "val", img_size: int = 256, num_images: int = len(DEMO_PHOTOS), **_):
        self.img_size, self.num_images = int(img_size), min(int(num_images), len(DEMO_PHOTOS))

    def make(self, i: int) -> Dict[str, object]:
        from .demo import skimage_texture

        img = Image.fromarray(skimage_texture(DEMO_PHOTOS[i]))
        return {"image": resize_center_crop_image(img, self.img_size), "id": DEMO_PHOTOS[i]}
