"""Interactive-segmentation datasets (one item per object instance) in the layouts RITM / SimpleClick read, and COCO
instance masks for offline use.

Items: ``{"image": (3, S, S) float in [0, 1], "mask": (S, S) int64 (1 = object, 0 = background, 255 = ignore),
"id": str}``.  Image and mask are resized to S x S without cropping (a crop could cut the clicked object away):
bilinear for the image, nearest for the mask.

* ``sbd``: ``img/<id>.jpg`` + ``inst/<id>.mat`` (``GTinst.Segmentation``) + ``train.txt`` / ``val.txt``; every
  instance is an item (the LoftUp / SimpleClick training set).
* ``grabcut``: ``data_GT/<id>.*`` + ``boundary_GT/<id>.bmp`` (255 object, 128 = uncertain band: ignored).
* ``berkeley``: ``images/<id>.jpg`` + ``masks/<id>.png``; ``davis_interactive``: ``img/<id>.jpg`` + ``gt/<id>.png``
  (DAVIS-345, the interactive DAVIS set); a mask pixel > 127 is the object.
* ``coco_instances``: COCO 2017 ``<split>2017/*.jpg`` + ``annotations/instances_<split>2017.json``; the polygons of
  non-crowd instances of at least ``min_area`` px, at most ``per_image`` per image (largest first).

The evaluation sets have no training split: their ``train`` split reads SBD from ``train_root`` (LoftUp trains once on
SBD and tests on each)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from upbench.errors import UpbenchError
from upbench.registry import DATASETS

from .base import IGNORE, UNREADABLE, list_images, missing_data, unreadable


def squash(image: Image.Image, mask: np.ndarray, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image (3, S, S) in [0, 1], mask (S, S) int64) resized to S x S: bilinear (antialiased) / nearest."""
    import torchvision.transforms.functional as TF

    img = TF.to_tensor(image.convert("RGB"))
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.from_numpy(np.ascontiguousarray(mask).astype(np.float32))[None, None]
    m = F.interpolate(m, size=(size, size), mode="nearest-exact")[0, 0].to(torch.int64)
    return img.clamp(0, 1), m


class InstanceDataset(torch.utils.data.Dataset):
    """(image path, mask reader, id) triples; the reader returns the (H, W) int mask at the image's size."""

    name = "instances"
    kind = "instances"

    def __init__(self, items: List[Tuple[str, Callable[[], np.ndarray], str]], img_size: int):
        self.items, self.img_size = items, int(img_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        path, read_mask, ident = self.items[i]
        try:
            with Image.open(path) as img:
                img.load()
                mask = read_mask()
                if mask.shape[:2] != (img.height, img.width):
                    raise UpbenchError(f"{getattr(read_mask, 'path', path)}: the mask is {mask.shape[1]}x{mask.shape[0]}"
                                       f" but its image {path} is {img.width}x{img.height}; they must match")
                image, m = squash(img, mask, self.img_size)
        except UNREADABLE as exc:
            raise unreadable(path, exc) from None
        return {"image": image, "mask": m, "id": ident}


def _mask_file(path: Path, how: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            with Image.open(path) as m:
                arr = np.asarray(m.convert("L")).astype(np.int64)
        except UNREADABLE as exc:
            raise unreadable(str(path), exc, "mask") from None
        if how == "grabcut":   # 255 object, 128 the uncertain band between (ignored, as RITM), 0 background
            return np.where(arr == 128, IGNORE, (arr > 128).astype(np.int64))
        return (arr > 127).astype(np.int64)
    read.path = str(path)   # type: ignore[attr-defined]
    return read


def _sbd_items(root: str, split: str) -> List[Tuple[str, Callable[[], np.ndarray], str]]:
    base = Path(os.path.expanduser(str(root)))
    ids_file = base / ("train.txt" if split == "train" else "val.txt")
    if not ids_file.exists() or not (base / "inst").is_dir():
        raise missing_data("sbd", str(root), "img/<id>.jpg + inst/<id>.mat (GTinst) + train.txt / val.txt",
                           "the SBD release (Hariharan et al.), as RITM / SimpleClick use it")
    from scipy.io import loadmat

    items = []
    for ident in [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]:
        mat = base / "inst" / f"{ident}.mat"
        try:
            seg = np.asarray(loadmat(str(mat))["GTinst"][0][0][0]).astype(np.int64)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise unreadable(str(mat), exc, "SBD instance file (GTinst)") from None
        for k in sorted(int(v) for v in np.unique(seg) if v > 0):
            def read(seg=seg, k=k) -> np.ndarray:
                return (seg == k).astype(np.int64)
            items.append((str(base / "img" / f"{ident}.jpg"), read, f"{ident}_{k}"))
    return items


@DATASETS.register("sbd")
def sbd(root: str, split: str = "train", img_size: int = 224, **_) -> InstanceDataset:
    ds = InstanceDataset(_sbd_items(root, split), img_size)
    ds.name = "sbd"
    return ds


def _eval_set(name: str, root: str, split: str, img_size: int, train_root: Optional[str], image_dir: str,
              mask_dir: str, mask_ext: str, how: str, layout: str, where: str) -> InstanceDataset:
    if split == "train":   # an evaluation set trains on SBD (LoftUp / SimpleClick)
        if not train_root:
            raise UpbenchError(f"{name}: has no training split; set dataset.train_root=/path/to/SBD (LoftUp trains on "
                               "SBD) or train on another set")
        ds = sbd(train_root, "train", img_size)
        return ds
    base = Path(os.path.expanduser(str(root)))
    items = []
    for img in list_images(base / image_dir):
        mask = next((p for p in (base / mask_dir).glob(img.stem + mask_ext)), None) if (base / mask_dir).is_dir() \
            else None
        if mask is not None:
            items.append((str(img), _mask_file(mask, how), img.stem))
    if not items:
        raise missing_data(name, str(root), layout, where)
    ds = InstanceDataset(items, img_size)
    ds.name = name
    return ds


@DATASETS.register("grabcut")
def grabcut(root: str, split: str = "val", img_size: int = 224, train_root: Optional[str] = None, **_):
    return _eval_set("grabcut", root, split, img_size, train_root, "data_GT", "boundary_GT", ".bmp", "grabcut",
                     "data_GT/<id>.jpg|png|bmp + boundary_GT/<id>.bmp (50 images)", "the RITM datasets page")


@DATASETS.register("berkeley")
def berkeley(root: str, split: str = "val", img_size: int = 224, train_root: Optional[str] = None, **_):
    return _eval_set("berkeley", root, split, img_size, train_root, "images", "masks", ".*", "binary",
                     "images/<id>.jpg + masks/<id>.png (100 instances)", "the RITM datasets page")


@DATASETS.register("davis_interactive")
def davis_interactive(root: str, split: str = "val", img_size: int = 224, train_root: Optional[str] = None, **_):
    return _eval_set("davis_interactive", root, split, img_size, train_root, "img", "gt", ".*", "binary",
                     "img/<id>.jpg + gt/<id>.png (DAVIS-345)", "the RITM datasets page")


def _polygons_mask(segmentation, h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in segmentation:
        if len(poly) >= 6:
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(canvas).astype(np.int64)


@DATASETS.register("coco_instances")
def coco_instances(root: str, split: str = "train", img_size: int = 224, min_area: float = 1500.0,
                   per_image: int = 1, **_) -> InstanceDataset:
    base = Path(os.path.expanduser(str(root)))
    ann = base / "annotations" / f"instances_{split}2017.json"
    folder = base / f"{split}2017"
    if not ann.exists() or not folder.is_dir():
        raise missing_data("coco_instances", str(root), f"{split}2017/*.jpg + annotations/instances_{split}2017.json",
                           "cocodataset.org (COCO 2017)")
    try:
        data = json.loads(ann.read_text())
        images = {im["id"]: im for im in data["images"]}
        anns = data["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpbenchError(f"{ann}: not a COCO instances file ({type(exc).__name__})") from None
    by_image: Dict[int, list] = {}
    for a in anns:   # crowd regions are RLE blobs of many objects: not one instance to click on
        if not a.get("iscrowd") and isinstance(a.get("segmentation"), list) and a.get("area", 0) >= min_area:
            by_image.setdefault(a["image_id"], []).append(a)
    items = []
    for image_id in sorted(by_image):
        im = images.get(image_id)
        path = folder / im["file_name"] if im else None
        if path is None or not path.exists():
            continue
        for a in sorted(by_image[image_id], key=lambda a: (-a["area"], a["id"]))[:int(per_image)]:
            def read(a=a, im=im) -> np.ndarray:
                return _polygons_mask(a["segmentation"], int(im["height"]), int(im["width"]))
            items.append((str(path), read, f"{path.stem}_{a['id']}"))
    if not items:
        raise missing_data("coco_instances", str(root), f"instances of at least {min_area} px in "
                           f"annotations/instances_{split}2017.json", "cocodataset.org (COCO 2017)")
    ds = InstanceDataset(items, img_size)
    ds.name = "coco_instances"
    return ds
