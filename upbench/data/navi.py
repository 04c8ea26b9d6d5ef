"""NAVI (Jampani et al., 2023) as Probe3D reads it for depth and surface normals (LoftUp Table 3).

Layout (NAVI v1): ``<root>/<object>/<scene>/images/<id>.jpg`` (Probe3D's ``downsampled_<id>.jpg`` preferred when
present), ``depth/<same name>.png`` (16-bit, inverse depth: depth_m = 65535 * 10 / value / 1000, 0 = none),
optional ``masks/``, and ``<scene>/annotations.json`` (per image ``filename``, ``image_size`` and
``camera.focal_length``).  Splits as Probe3D: ``train`` = the ``multiview_*`` scenes, ``val`` / ``test`` = the
``wild_set`` scenes; every ``every``-th image (Probe3D keeps every 4th).  Each image is cropped to the square around
the object (Probe3D's ``bbox_crop``), then resized to ``img_size``; ``focal_px`` follows the crop and resize, so
surface normals can be derived from depth exactly as Probe3D does (``compute_normal``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from upbench.errors import UpbenchError
from upbench.registry import DATASETS

from .base import UNREADABLE, list_images, missing_data, unreadable

LAYOUT = ("<object>/{multiview_*,wild_set}/images/<id>.jpg + depth/<id>.png (16-bit inverse depth) + "
          "annotations.json (camera.focal_length)")


def read_navi_depth(path: str) -> np.ndarray:
    """Metres from NAVI's 16-bit inverse-depth PNG (Probe3D ``read_depth`` with scale 10, then mm -> m)."""
    try:
        with Image.open(path) as img:
            raw = np.asarray(img).astype(np.float64)
    except UNREADABLE as exc:
        raise unreadable(path, exc, "depth map") from None
    out = np.zeros(raw.shape[:2], dtype=np.float32)
    ok = raw[..., 0] > 0 if raw.ndim == 3 else raw > 0
    vals = raw[..., 0] if raw.ndim == 3 else raw
    out[ok] = (65535.0 * 10.0 / vals[ok]) / 1000.0
    return out


def object_square(valid: np.ndarray) -> Tuple[int, int, int]:
    """(top, left, side) of the square around the valid pixels, kept inside the image (Probe3D ``bbox_crop``:
    centred on the object's box when it fits, else pushed back inside)."""
    h, w = valid.shape
    ys, xs = np.nonzero(valid)
    if ys.size == 0:
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    side = int(min(max(bottom - top, right - left), min(h, w)))
    side = max(side, 1)
    t = int(top - (side - (bottom - top)) // 2)
    lft = int(left - (side - (right - left)) // 2)
    return int(np.clip(t, 0, h - side)), int(np.clip(lft, 0, w - side)), side


@DATASETS.register("navi")
class NAVI(torch.utils.data.Dataset):
    """Items: ``{"image", "depth" (m, 0 = none), "focal_px", "id"}`` at ``img_size`` x ``img_size``."""

    name = "navi"
    kind = "depth"

    def __init__(self, root: str, split: str = "train", img_size: int = 224, every: int = 4,
                 bbox_crop: bool = True, **_):
        base = Path(os.path.expanduser(str(root)))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UpbenchError(f"dataset.every={every}: expected a positive integer (Probe3D keeps every 4th image)")
        wild = split in ("val", "test")
        self.img_size, self.bbox_crop = int(img_size), bool(bbox_crop)
        self.items: List[Tuple[str, str, Optional[float], Optional[Tuple[int, int]]]] = []
        for obj in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            for scene in sorted(p for p in obj.iterdir() if p.is_dir()):
                if (scene.name == "wild_set") != wild or not (wild or scene.name.startswith("multiview")):
                    continue
                annos = self._annotations(scene)
                images = list_images(scene / "images")
                small = [p for p in images if p.name.startswith("downsampled_")]
                for img in small or [p for p in images if "_" not in p.stem]:
                    depth = scene / "depth" / (img.stem + ".png")
                    if not depth.exists():
                        continue
                    anno = annos.get(img.stem.replace("downsampled_", ""), {})
                    focal = (anno.get("camera") or {}).get("focal_length")
                    size = anno.get("image_size")
                    self.items.append((str(img), str(depth), float(focal) if focal else None,
                                       (int(size[0]), int(size[1])) if size else None))
        self.items = self.items[::every]
        if not self.items:
            raise missing_data("navi", str(root), LAYOUT, "github.com/google/navi (NAVI v1), as Probe3D uses it")

    @staticmethod
    def _annotations(scene: Path) -> Dict[str, dict]:
        path = scene / "annotations.json"
        if not path.exists():
            return {}
        try:
            return {str(a["filename"]).split(".")[0]: a for a in json.loads(path.read_text())}
        except (ValueError, KeyError, TypeError) as exc:
            raise UpbenchError(f"{path}: not NAVI annotations ({type(exc).__name__}); expected a list of "
                               "{filename, image_size, camera: {focal_length}}") from None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        import torchvision.transforms.functional as TF

        img_path, depth_path, focal, orig = self.items[i]
        try:
            with Image.open(img_path) as img:
                rgb = TF.to_tensor(img.convert("RGB"))
        except UNREADABLE as exc:
            raise unreadable(img_path, exc) from None
        depth = read_navi_depth(depth_path)
        if depth.shape != tuple(rgb.shape[-2:]):
            raise UpbenchError(f"{depth_path}: the depth map is {depth.shape[1]}x{depth.shape[0]} but its image "
                               f"{img_path} is {rgb.shape[2]}x{rgb.shape[1]}; they must have the same size")
        h, w = depth.shape
        # the annotation's focal length is for the full-size image; the downsampled one scales with its short side
        f_px = focal * min(h, w) / min(orig) if focal and orig else None
        if self.bbox_crop:
            top, left, side = object_square(depth > 0)
        else:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
        S = self.img_size
        rgb = rgb[:, top:top + side, left:left + side]
        d = torch.from_numpy(depth[top:top + side, left:left + side].copy())
        image = F.interpolate(rgb[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
        d = F.interpolate(d[None, None], size=(S, S), mode="nearest-exact")[0, 0]
        return {"image": image.clamp(0, 1), "depth": d, "id": Path(img_path).stem,
                "focal_px": f_px * S / side if f_px else None}
