"""COCO-Stuff-27: the 182 fine COCO-Stuff ids mapped to 27 coarse classes (12 thing + 15 stuff supercategories,
the ordering of the IIC / STEGO curated benchmark used by the JAFAR suite); 255 = unlabeled.

Layouts: the STEGO / JAFAR one (``curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt`` +
``dataset/{images,annotations}/<split>2017/``), ``coco_stuff164k/{images,annotations}/{train2017,val2017}/`` (mmseg;
raw ``<id>.png`` fine maps, or ``<id>_labelTrainIds.png`` 171-class maps), ``stuffthingmaps_trainval2017/<split>/``
beside ``<split>/`` images, or a flat ``images/`` + ``stuffthingmaps/``.

``image_list``: ``auto`` (default) reads the curated list of the published benchmark
(``curated/<split>2017/Coco164kFull_Stuff_Coarse.txt``, the IIC / STEGO list the JAFAR suite evaluates on) when the
folder has one and otherwise takes every image -- rows record which (``image_list: curated | all``), since numbers on
all images are not comparable with the papers'; ``all`` takes every image; a path restricts to that id list."""
from pathlib import Path
from typing import Optional

import numpy as np

from upbench.registry import DATASETS

from .base import IGNORE, SegDataset, list_images, missing_data, pair_by_stem, read_id_list

COARSE_NAMES = [
    "electronic-things", "appliance-things", "food-things", "furniture-things", "indoor-things", "kitchen-things",
    "accessory-things", "animal-things", "outdoor-things", "person-things", "sports-things", "vehicle-things",
    "ceiling-stuff", "floor-stuff", "food-stuff", "furniture-stuff", "rawmaterial-stuff", "textile-stuff",
    "wall-stuff", "window-stuff", "building-stuff", "ground-stuff", "plant-stuff", "sky-stuff", "solid-stuff",
    "structural-stuff", "water-stuff",
]
# fine index (COCO category id - 1, as stored in stuffthingmaps) -> coarse index; 255 for ids COCO never uses
_FINE_TO_COARSE = [
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 255, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 255, 6, 6, 255, 255, 6, 6,
    6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 255, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
    255, 3, 255, 255, 3, 255, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 255, 4, 4, 4, 4, 4, 4, 4, 255, 17, 17, 22, 20, 20,
    22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22,
    21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17,
    14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,
    19, 24,
]
FINE_TO_COARSE = np.full(256, IGNORE, dtype=np.int64)
FINE_TO_COARSE[: len(_FINE_TO_COARSE)] = _FINE_TO_COARSE
# mmseg's 171-class train ids enumerate the fine ids that COCO uses, in order
TRAIN171_TO_COARSE = np.full(256, IGNORE, dtype=np.int64)
TRAIN171_TO_COARSE[:171] = [c for c in _FINE_TO_COARSE if c != IGNORE]

LAYOUT = ("curated/<split>2017/Coco164kFull_Stuff_Coarse.txt + dataset/{images,annotations}/<split>2017/ (STEGO), "
          "coco_stuff164k/{images,annotations}/{train2017,val2017}/ (annotations: stuffthingmaps <id>.png), "
          "or images/ + stuffthingmaps/")
CURATED = "Coco164kFull_Stuff_Coarse.txt"


def curated_list(base: Path, split: str) -> Optional[Path]:
    """The curated id list of the STEGO / JAFAR layout for ``split``, if the folder has one."""
    sub = f"{split}2017" if split in ("train", "val") else split
    for root in (base, base.parent):
        path = root / "curated" / sub / CURATED
        if path.is_file():
            return path
    return None


@DATASETS.register("cocostuff")
class CocoStuff27(SegDataset):
    name = "cocostuff"
    class_names = tuple(COARSE_NAMES)
    num_classes = 27

    def __init__(self, root: str, split: str = "val", img_size: int = 448,
                 image_list: Optional[str] = "auto", label_resize: str = "pil_nearest", **_):
        base = Path(root).expanduser()
        curated = curated_list(base, split) if image_list in (None, "auto") else None
        if (base / "coco_stuff164k").is_dir():
            base = base / "coco_stuff164k"
        sub = f"{split}2017" if split in ("train", "val") else split
        candidates = [
            (base / "dataset" / "images" / sub, base / "dataset" / "annotations" / sub),   # STEGO / JAFAR
            (base / "images" / sub, base / "annotations" / sub),
            (base / sub, base / "stuffthingmaps_trainval2017" / sub),
            (base / "images", base / "stuffthingmaps"),
        ]
        pairs = []
        for img_dir, ann_dir in candidates:
            images = list_images(img_dir)
            pairs = pair_by_stem(images, ann_dir, lambda s: f"{s}.png") or \
                pair_by_stem(images, ann_dir, lambda s: f"{s}_labelTrainIds.png")
            if pairs:
                break
        if curated is not None:
            keep, kind = read_id_list(str(curated)), "curated"
        elif image_list not in (None, "auto", "all"):
            keep, kind = read_id_list(image_list), f"list {Path(str(image_list)).name}"
        else:
            keep, kind = None, "all"
        if keep is not None:
            pairs = [p for p in pairs if Path(p[0]).stem in keep]
        if not pairs:
            raise missing_data("cocostuff", root, LAYOUT,
                               "https://github.com/nightrome/cocostuff (images + stuffthingmaps_trainval2017.zip)")
        super().__init__(pairs, img_size, label_resize=label_resize)
        self.flags["image_list"] = kind

    def read_label(self, path: str) -> np.ndarray:
        arr = super().read_label(path)
        table = TRAIN171_TO_COARSE if path.endswith("_labelTrainIds.png") else FINE_TO_COARSE
        return self.map_ids(path, arr, table)
