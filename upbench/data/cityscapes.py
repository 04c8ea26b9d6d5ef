"""Cityscapes fine annotations, 19 train ids, 255 = ignore.

Layout: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/<split>/<city>/*_gtFine_labelIds.png``
(torchvision / mmseg; ``*_labelTrainIds.png`` are used when the labelIds files are absent)."""
from pathlib import Path

import numpy as np

from upbench.registry import DATASETS

from . import classes
from .base import IGNORE, SegDataset, missing_data

# labelId -> trainId (official cityscapesScripts table); everything else is ignored
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
              26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE, dtype=np.int64)
for _k, _v in _TRAIN_IDS.items():
    LABEL_ID_TO_TRAIN_ID[_k] = _v


@DATASETS.register("cityscapes")
class Cityscapes(SegDataset):
    name = "cityscapes"
    num_classes = 19
    class_names = classes.CITYSCAPES

    def __init__(self, root: str, split: str = "val", img_size: int = 448, label_resize: str = "pil_nearest", **_):
        base = Path(root).expanduser()
        pairs = []
        for img in sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            gt = base / "gtFine" / split / img.parent.name
            if (gt / f"{stem}_gtFine_labelIds.png").exists():
                pairs.append((str(img), str(gt / f"{stem}_gtFine_labelIds.png")))
            elif (gt / f"{stem}_gtFine_labelTrainIds.png").exists():
                pairs.append((str(img), str(gt / f"{stem}_gtFine_labelTrainIds.png")))
        if not pairs:
            raise missing_data("cityscapes", root, "leftImg8bit/<split>/<city>/*_leftImg8bit.png + "
                               "gtFine/<split>/<city>/*_gtFine_labelIds.png", "https://www.cityscapes-dataset.com")
        super().__init__(pairs, img_size, label_resize=label_resize)

    def read_label(self, path: str) -> np.ndarray:
        arr = super().read_label(path)
        return self.map_ids(path, arr, LABEL_ID_TO_TRAIN_ID) if path.endswith("_labelIds.png") else arr.astype(np.int64)
