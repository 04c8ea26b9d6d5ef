"""Pascal VOC 2012 segmentation (21 classes, 255 = boundary/ignore).

Accepted layouts: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/<split>.txt}``
(torchvision / mmseg), or a flat folder ``images/`` + ``masks_index/`` (or ``SegmentationClass/``) of index PNGs."""
from pathlib import Path

from upbench.registry import DATASETS

from . import classes
from .base import SegDataset, list_images, missing_data, pair_by_stem

LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt}, "
          "or images/ + masks_index/")


@DATASETS.register("voc")
class VOC(SegDataset):
    name = "voc"
    num_classes = 21
    class_names = classes.VOC

    def __init__(self, root: str, split: str = "val", img_size: int = 448, label_resize: str = "pil_nearest", **_):
        base = Path(root).expanduser()
        for cand in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
            if (cand / "JPEGImages").is_dir():
                ids_file = cand / "ImageSets" / "Segmentation" / f"{split}.txt"
                ids = ids_file.read_text().split() if ids_file.exists() else None
                images = [cand / "JPEGImages" / f"{i}.jpg" for i in ids] if ids else list_images(cand / "JPEGImages")
                pairs = pair_by_stem(images, cand / "SegmentationClass", lambda s: f"{s}.png")
                break
        else:
            label_dir = next((base / d for d in ("masks_index", "SegmentationClass") if (base / d).is_dir()), None)
            pairs = pair_by_stem(list_images(base / "images"), label_dir, lambda s: f"{s}.png") if label_dir else []
        if not pairs:
            raise missing_data("voc", root, LAYOUT, "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
                               "(torchvision.datasets.VOCSegmentation(download=True) also works)")
        super().__init__(pairs, img_size, label_resize=label_resize)
