"""ADE20K (ADEChallengeData2016): 151 classes with index 0 ("other") kept as a class, as in the JAFAR suite.

Layout: ``ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}`` (mmseg), or flat
``images/*.jpg`` + ``annotations/*.png``."""
from pathlib import Path

from upbench.registry import DATASETS

from . import classes
from .base import SegDataset, list_images, missing_data, pair_by_stem

SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


@DATASETS.register("ade20k")
class ADE20K(SegDataset):
    name = "ade20k"
    num_classes = 151
    class_names = classes.ADE20K

    def __init__(self, root: str, split: str = "val", img_size: int = 448, label_resize: str = "pil_nearest", **_):
        base = Path(root).expanduser()
        if (base / "ADEChallengeData2016").is_dir():
            base = base / "ADEChallengeData2016"
        sub = SPLITS.get(split, split)
        img_dir, ann_dir = base / "images" / sub, base / "annotations" / sub
        if not img_dir.is_dir():  # flat layout
            img_dir, ann_dir = base / "images", base / "annotations"
        pairs = pair_by_stem(list_images(img_dir), ann_dir, lambda s: f"{s}.png")
        if not pairs:
            raise missing_data("ade20k", root, "ADEChallengeData2016/{images,annotations}/{training,validation}/",
                               "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip")
        super().__init__(pairs, img_size, label_resize=label_resize)
