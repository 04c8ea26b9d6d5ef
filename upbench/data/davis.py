"""DAVIS-2017 (semi-supervised video object segmentation) in its release layout:

``<root>/JPEGImages/480p/<seq>/00000.jpg ...``, ``<root>/Annotations/480p/<seq>/00000.png ...`` (palette PNGs whose
pixel values are object ids: 0 background, 1..K objects, 255 void) and ``<root>/ImageSets/2017/<split>.txt`` (one
sequence name per line).  An item is one sequence: ``{"id": name, "sequence": VideoSequence}``; frames and
annotations are read when asked for, at their original size (the task decides how to resize them)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from upbench.errors import UpbenchError
from upbench.registry import DATASETS

from .base import UNREADABLE, missing_data, unreadable

LAYOUT = ("JPEGImages/<resolution>/<seq>/*.jpg, Annotations/<resolution>/<seq>/*.png (palette PNGs of object ids) "
          "and ImageSets/<year>/<split>.txt")
WHERE = "https://davischallenge.org/davis2017/code.html (DAVIS-2017 TrainVal 480p)"


class VideoSequence:
    """One annotated clip: ``frames`` / ``annotations`` (paths, sorted by file name, one annotation per frame)."""

    def __init__(self, name: str, frames: List[Path], annotations: List[Path]):
        self.name, self.frames, self.annotations = name, frames, annotations

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def frame_names(self) -> List[str]:
        return [p.stem for p in self.frames]

    def image(self, t: int) -> Image.Image:
        """Frame ``t`` as an RGB PIL image at its original size."""
        try:
            with Image.open(self.frames[t]) as img:
                return img.convert("RGB")
        except UNREADABLE as exc:
            raise unreadable(str(self.frames[t]), exc) from None

    def annotation(self, t: int) -> np.ndarray:
        """Annotation ``t`` as a (H, W) uint8 map of object ids (the palette indices)."""
        path = self.annotations[t]
        try:
            with Image.open(path) as img:
                mode = img.mode
                arr = np.array(img)
        except UNREADABLE as exc:
            raise unreadable(str(path), exc, "annotation") from None
        if mode not in ("P", "L") or arr.ndim != 2:
            raise UpbenchError(f"{path}: a {mode} image, not an index PNG; DAVIS annotations are palette ('P') PNGs "
                               "whose pixel values are object ids (0 background, 1..K objects)")
        return arr.astype(np.uint8, copy=False)

    def palette(self) -> Optional[List[int]]:
        """The first annotation's colour palette (for writing predictions the same way), if it has one."""
        try:
            with Image.open(self.annotations[0]) as img:
                return img.getpalette() if img.mode == "P" else None
        except UNREADABLE:
            return None


@DATASETS.register("davis")
class DAVIS(torch.utils.data.Dataset):
    """The sequences of ``ImageSets/<year>/<split>.txt``; every frame must have its annotation (the semi-supervised
    evaluation scores frames 1..T-2 against them)."""

    name = "davis"
    kind = "video"

    def __init__(self, root: str, split: str = "val", resolution: str = "480p", year: int = 2017, **_):
        base = Path(str(root)).expanduser()
        split_file = base / "ImageSets" / str(year) / f"{split}.txt"
        if not split_file.is_file() or not (base / "JPEGImages" / resolution).is_dir():
            raise missing_data(self.name, str(root), LAYOUT.replace("<resolution>", resolution)
                               .replace("<year>", str(year)).replace("<split>", split), WHERE)
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        self.sequences: List[VideoSequence] = []
        for seq in names:
            frames = sorted((base / "JPEGImages" / resolution / seq).glob("*.jpg"))
            annotations = sorted((base / "Annotations" / resolution / seq).glob("*.png"))
            if not frames:
                raise UpbenchError(f"{self.name}: sequence '{seq}' of {split_file} has no frames in "
                                   f"{base / 'JPEGImages' / resolution / seq}; expected {LAYOUT}")
            if [p.stem for p in frames] != [p.stem for p in annotations]:
                missing = sorted({p.stem for p in frames} - {p.stem for p in annotations})[:3]
                raise UpbenchError(f"{self.name}: sequence '{seq}' has {len(frames)} frames but {len(annotations)} "
                                   f"annotations in {base / 'Annotations' / resolution / seq} (e.g. no "
                                   f"{', '.join(m + '.png' for m in missing) or 'match'}); the evaluation needs one "
                                   "annotation per frame (the TrainVal release has them)")
            self.sequences.append(VideoSequence(seq, frames, annotations))
        self.root, self.split = str(base), split
        self.flags: Dict[str, object] = {"resolution": resolution}

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Dict[str, object]:
        seq = self.sequences[i]
        return {"id": seq.name, "sequence": seq}


@DATASETS.register("davis_mini")
class DAVISMini(DAVIS):
    """The offline clip set in the DAVIS layout (real COCO photos and masks under known camera motion); its numbers
    are its own, never DAVIS's."""

    name = "davis_mini"
