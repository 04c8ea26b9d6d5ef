"""Prompt sets for text-to-image upscaling (UPLiFT Tables 2-3): items ``{"prompt": str, "id": str}`` plus, where
the set has them, ``"image"``: the real image of that caption (short side -> ``reference_size``, centre crop), the
reference set of FID / patch-FID.  ``has_references`` says whether a set can give FID."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image

from upbench.errors import UpbenchError

from upbench.registry import DATASETS

from .base import GeneratedItems, list_images, missing_data, resize_center_crop_image


class PromptSet(torch.utils.data.Dataset):
    kind = "prompts"
    name = "prompts"

    def __init__(self, pairs: List[Tuple[str, str, Optional[Path]]], reference_size: int, num_prompts: Optional[int]):
        if num_prompts:
            pairs = pairs[:int(num_prompts)]
        self.pairs, self.reference_size = pairs, int(reference_size)
        self.has_references = bool(pairs) and all(p is not None for _, _, p in pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Dict[str, object]:
        key, prompt, path = self.pairs[i]
        item: Dict[str, object] = {"prompt": prompt, "id": key}
        if path is not None:
            with Image.open(path) as img:
                item["image"] = resize_center_crop_image(img, self.reference_size)
        return item


@DATASETS.register("coco_captions")
class CocoCaptions(PromptSet):
    """COCO captions: the first caption of every image, in image-id order (COCO-5k = the first 5000).
    Layout: ``root/annotations/captions_{split}.json`` and the images in ``root/{split}/`` (or ``root/images/``)."""

    name = "coco_captions"

    def __init__(self, root: str, split: str = "val2014", reference_size: int = 1024,
                 num_prompts: Optional[int] = 5000, **_):
        base = Path(os.path.expanduser(str(root)))
        ann = base / "annotations" / f"captions_{split}.json"
        if not ann.is_file():
            raise missing_data(self.name, str(root), f"annotations/captions_{split}.json and {split}/*.jpg",
                               "https://cocodataset.org (annotations_trainval2014.zip, val2014.zip)")
        data = json.loads(ann.read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first: Dict[int, str] = {}
        for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"])):
            first.setdefault(a["image_id"], " ".join(a["caption"].split()))
        folder = next((d for d in (base / split, base / "images") if d.is_dir()), None)
        pairs = [(str(i), first[i], folder / files[i] if folder else None) for i in sorted(first)]
        super().__init__(pairs, reference_size, num_prompts)


@DATASETS.register("image_captions")
class ImageCaptions(PromptSet):
    """Image-caption pairs in one folder, as img2dataset writes them (``x.jpg`` + ``x.txt``, any depth), e.g. a
    reLAION-5k sample."""

    name = "image_captions"

    def __init__(self, root: str, split: str = "val", reference_size: int = 1024,
                 num_prompts: Optional[int] = 5000, **_):
        base = Path(os.path.expanduser(str(root)))
        pairs = [(p.stem, " ".join(p.with_suffix(".txt").read_text().split()), p)
                 for p in list_images(base, recursive=True) if p.with_suffix(".txt").is_file()]
        if not pairs:
            raise missing_data(self.name, str(root), "image files each with a caption file of the same name "
                               "(x.jpg + x.txt, as img2dataset writes them)", "the set's release (e.g. reLAION)")
        super().__init__(pairs, reference_size, num_prompts)


@DATASETS.register("relaion")
class ReLAION(ImageCaptions):
    """A reLAION sample (UPLiFT Table 3 uses 5k image-caption pairs)."""

    name = "relaion"


@DATASETS.register("prompt_file")
class PromptFile(PromptSet):
    """One prompt per line of a text file; no reference images, so no FID (use ``task.fid=false``)."""

    name = "prompt_file"

    def __init__(self, path: str, split: str = "val", reference_size: int = 1024,
                 num_prompts: Optional[int] = None, **_):
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise UpbenchError(f"prompt_file: no file '{p}'; write one prompt per line and set dataset.path=/path")
        lines = [" ".join(line.split()) for line in p.read_text().splitlines()]
        pairs = [(f"{i:05d}", text, None) for i, text in enumerate(t for t in lines if t)]
        if not pairs:
            raise UpbenchError(f"prompt_file: '{p}' holds no prompts (one per line)")
        super().__init__(pairs, reference_size, num_prompts)


# Captions of the scikit-image photos used as the demo reference set (no download).
DEMO_CAPTIONS = (("astronaut", "a portrait photo of an astronaut in a white space suit in front of a flag"),
                 ("chelsea", "a photo of a tabby cat looking at the camera"),
                 ("coffee", "a cup of coffee on a saucer, seen from above"),
                 ("rocket", "a space rocket standing on the launch pad under a blue sky"),
                 ("cat", "a close-up photo of a cat's face"),
                 ("immunohistochemistry", "a microscope image of stained tissue"))


@DATASETS.register("demo_prompts")
class DemoPrompts(GeneratedItems, PromptSet):
    """Captions of the photos that ship inside scikit-image, with those photos as references (no download)."""

    name = "demo_prompts"
    has_references = True

    def __init__(self, split: str = "val", reference_size: int = 512, num_prompts: int = len(DEMO_CAPTIONS), **_):
        self.reference_size, self.num_images = int(reference_size), min(int(num_prompts), len(DEMO_CAPTIONS))

    def make(self, i: int) -> Dict[str, object]:
        from .demo import skimage_texture

        key, prompt = DEMO_CAPTIONS[i]
        image = resize_center_crop_image(Image.fromarray(skimage_texture(key)), self.reference_size)
        return {"prompt": prompt, "id": key, "image": image}
