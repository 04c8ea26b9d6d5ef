"""Segmentation datasets: common item format, the JAFAR transforms, and layout helpers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from upbench.errors import UpbenchError

IGNORE = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG", ".bmp", ".webp")


def resize_center_crop_image(img: Image.Image, size: int) -> torch.Tensor:
    """JAFAR image transform: short side -> ``size`` (bilinear), centre crop ``size``; float tensor in [0, 1]."""
    import torchvision.transforms.functional as TF

    img = TF.resize(img.convert("RGB"), size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [size, size])
    return TF.to_tensor(img)


def short_side_crop_box(h: int, w: int, size: int) -> Tuple[int, int, int, int]:
    """(resized h, resized w, top, left) of the JAFAR geometry: short side -> ``size``, centre crop ``size``."""
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return nh, nw, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))


LABEL_RESIZE = ("pil_nearest", "nearest_exact")


def resize_center_crop_label(label: np.ndarray, size: int, method: str = "pil_nearest") -> torch.Tensor:
    """The suites' label transform: short side -> ``size``, centre crop ``size``; int64 (H, W).

    ``pil_nearest`` (default): what the official code computes -- torchvision's ``Resize(NEAREST_EXACT)`` on a PIL
    label is PIL's NEAREST; ``nearest_exact``: ``F.interpolate(mode="nearest-exact")`` on a tensor, which rounds exact
    ties the other way (a few rows / columns differ)."""
    label = np.ascontiguousarray(label)
    nh, nw, top, left = short_side_crop_box(*label.shape[-2:], size)
    if method == "pil_nearest":
        mode = "L" if label.dtype == np.uint8 else "I"
        img = Image.fromarray(label if mode == "L" else label.astype(np.int32), mode=mode)
        t = torch.from_numpy(np.asarray(img.resize((nw, nh), Image.NEAREST)).astype(np.int64))
    elif method == "nearest_exact":
        t = F.interpolate(torch.from_numpy(label).to(torch.float32)[None, None], size=(nh, nw),
                          mode="nearest-exact")[0, 0].to(torch.int64)
    else:
        raise UpbenchError(f"unknown dataset.label_resize '{method}'; valid: {', '.join(LABEL_RESIZE)}")
    return t[top:top + size, left:left + size].contiguous()


#: what reading a broken image / label file raises (PIL: OSError incl. UnidentifiedImageError, "truncated"; some
#: decoders SyntaxError / ValueError; numpy: ValueError for object arrays, which are never unpickled)
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, KeyError)


def unreadable(path: str, exc: BaseException, what: str = "image") -> UpbenchError:
    return UpbenchError(f"{path}: not a readable {what} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                        "replace or remove the file")


def load_image(path: str, size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(the JAFAR-transformed image, its original (h, w)); a broken file is one clear error naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return resize_center_crop_image(img, size), (img.height, img.width)
    except UNREADABLE as exc:
        raise unreadable(path, exc) from None


class SegDataset(torch.utils.data.Dataset):
    """Items: ``{"image": (3,S,S) float in [0,1], "label": (S,S) int64 (255 = ignore), "id": str}``."""

    name = "seg"
    num_classes: int = 0
    class_names: Tuple[str, ...] = ()
    ignore_index: int = IGNORE

    def __init__(self, pairs: Sequence[Tuple[str, str]], img_size: int = 448,
                 label_map: Optional[np.ndarray] = None, label_resize: str = "pil_nearest"):
        self.pairs = list(pairs)
        self.img_size = img_size
        self.label_map = label_map
        if label_resize not in LABEL_RESIZE:
            raise UpbenchError(f"unknown dataset.label_resize '{label_resize}'; valid: {', '.join(LABEL_RESIZE)}")
        self.label_resize = label_resize
        self.flags: Dict[str, object] = {"label_resize": label_resize}

    def __len__(self) -> int:
        return len(self.pairs)

    def read_label(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as img:
                arr = np.array(img)
        except UNREADABLE as exc:
            raise unreadable(path, exc, "label image") from None
        if arr.ndim == 3:
            arr = arr[..., 0]
        return arr

    def map_ids(self, path: str, label: np.ndarray, table: np.ndarray) -> np.ndarray:
        """``table[label]`` (a dataset's id map), with an id outside the table an error naming the file."""
        if label.size and (label.min() < 0 or int(label.max()) >= len(table)):
            raise UpbenchError(f"{path}: label id {int(label.max())} is outside this dataset's id map "
                               f"(0..{len(table) - 1}); is it a label file of {self.name}?")
        return table[label]

    def checked_label(self, path: str, label: np.ndarray) -> np.ndarray:
        """The label with the class-id mapping applied, every id checked: a class of this dataset or ignore."""
        if label.dtype.kind not in "iu" or (label.size and label.min() < 0):
            raise UpbenchError(f"{path}: label ids must be non-negative integers (got {label.dtype}); expected ids "
                               f"0..{self.num_classes - 1} and {self.ignore_index} = ignore")
        if self.label_map is not None:
            label = self.map_ids(path, label, self.label_map)
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            ids = sorted({int(v) for v in np.unique(label[bad])[:5]})
            raise UpbenchError(f"{path}: label ids {ids} are outside 0..{self.num_classes - 1} ({self.name} has "
                               f"{self.num_classes} classes; {self.ignore_index} = ignore); is it a label file of "
                               f"{self.name}?")
        return label

    def __getitem__(self, i: int) -> Dict[str, object]:
        img_path, lbl_path = self.pairs[i]
        label = self.read_label(lbl_path)
        image, (h, w) = load_image(img_path, self.img_size)
        if label.shape[:2] != (h, w):
            raise UpbenchError(f"{lbl_path}: the label is {label.shape[1]}x{label.shape[0]} but its image {img_path} is "
                               f"{w}x{h}; an image and its label must have the same size")
        label = self.checked_label(lbl_path, label)
        return {"image": image, "label": resize_center_crop_label(label, self.img_size, self.label_resize),
                "id": Path(img_path).stem}


class GeneratedItems:
    """Mixin for embedded sets whose items are made on demand by ``make(i)`` and kept (they are small)."""

    num_images: int = 0

    def make(self, i: int) -> Dict[str, object]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> Dict[str, object]:
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        items = self.__dict__.setdefault("_items", {})
        if i not in items:
            items[i] = self.make(i)
        return items[i]


def list_images(folder: Path, recursive: bool = False) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.suffix in IMAGE_EXTS)


def pair_by_stem(images: Sequence[Path], label_dir: Path, label_name: Callable[[str], str]) -> List[Tuple[str, str]]:
    pairs = []
    for img in images:
        lbl = label_dir / label_name(img.stem)
        if lbl.exists():
            pairs.append((str(img), str(lbl)))
    return pairs


def missing_data(dataset: str, root: str, layout: str, where: str) -> UpbenchError:
    return UpbenchError(f"{dataset}: no images found under '{root}'; expected {layout}; get it from {where} "
                        f"and set dataset.root=/path")


def read_id_list(path: Optional[str]) -> Optional[set]:
    if not path:
        return None
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise UpbenchError(f"image list not found: {p}")
    return {Path(line.strip()).stem for line in p.read_text().splitlines() if line.strip()}
