"""Video object segmentation (DAVIS-2017 semi-supervised) by label propagation through the affinities of upsampled
features, as LiFT, LoftUp and NAF evaluate it: the first frame's object masks are given, every later frame takes the
labels of its most similar context pixels (the first frame and the last ``n_last_frames`` frames), and the label
maps are scored with the official J (region), F (boundary) and J&F over frames 1..T-2, averaged over objects.

Two geometries (``task.propagation.implementation``), each the official script's:

* ``loftup``: frames squashed to ``imsize`` (PIL bicubic), backbone features on them, the upsampler asked for
  imsize/2 with the normalised image bilinearly halved as guidance; labels propagate on that imsize/2 grid and the
  prediction is brought back x2 (bilinear), then to the frame's size (PIL nearest).
* ``naf``: native frames cut to a multiple of the patch (bilinear), the upsampler asked for the feature grid x
  ``ups_factor`` with the image bicubic-resized to it as guidance; the prediction goes to the cut size, then PIL
  nearest to the frame's.

An upsampler that only ever gives its own grid (``lowres``) propagates on the feature grid (LiFT's low-res branch)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, TableSpec, Task
from upbench.timing import median_ms

from . import register
from ._vos_metrics import VOID, aggregate, evaluate_sequence
from ._vos_propagation import LabelPropagation, first_frame_labels, hard_labels

IMPLEMENTATIONS = ("loftup", "naf")
Size = Tuple[int, int]


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UpbenchError(f"task.propagation.{key}={value}: expected an integer >= {minimum}")
    return value


def check_propagation(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The propagation settings, each checked: one line naming the first bad one."""
    if not isinstance(cfg, Mapping):
        raise UpbenchError("task.propagation must be a mapping (see configs/task/vos.yaml)")
    impl = cfg.get("implementation")
    if impl not in IMPLEMENTATIONS:
        raise UpbenchError(f"unknown task.propagation.implementation '{impl}'; valid: {', '.join(IMPLEMENTATIONS)}")
    out: Dict[str, Any] = {"implementation": impl}
    size = cfg.get("imsize")
    sides = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(sides) != 2:
        raise UpbenchError(f"task.propagation.imsize={size}: expected one side or [height, width]")
    out["imsize"] = tuple(_positive_int(s, "imsize", 2) for s in sides)
    out["ups_factor"] = _positive_int(cfg.get("ups_factor"), "ups_factor")
    out["n_last_frames"] = _positive_int(cfg.get("n_last_frames"), "n_last_frames", 0)
    out["radius"] = _positive_int(cfg.get("radius"), "radius", 0)
    out["topk"] = _positive_int(cfg.get("topk"), "topk")
    temp = cfg.get("temperature")
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp > 0):
        raise UpbenchError(f"task.propagation.temperature={temp}: expected a number > 0 (the official value is 0.1)")
    out["temperature"] = float(temp)
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [0, 1] of an RGB PIL image (torchvision's ToTensor)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)


class Geometry:
    """How one implementation sizes a sequence of (H0, W0) frames for a backbone of patch ``patch``: the backbone
    input, the size the upsampler is asked for (and its guidance), the prediction size before the final resize."""

    def __init__(self, prop: Mapping[str, Any], patch: int, original: Size):
        self.impl, self.original = prop["implementation"], original
        if self.impl == "loftup":
            self.input: Size = prop["imsize"]
            self.requested: Size = (self.input[0] // 2, self.input[1] // 2)
            self.prediction: Size = (2 * self.requested[0], 2 * self.requested[1])
            self.guidance_mode = "bilinear"
        else:
            h0, w0 = original
            if h0 < patch or w0 < patch:
                raise UpbenchError(f"frames of {w0}x{h0} px are smaller than the backbone's patch ({patch} px); the "
                                   "naf geometry needs at least one patch per side")
            ups = prop["ups_factor"]
            self.input = (h0 // patch * patch, w0 // patch * patch)
            self.requested = (h0 // patch * ups, w0 // patch * ups)
            self.prediction = (self.requested[0] * patch // ups, self.requested[1] * patch // ups)
            self.guidance_mode = "bicubic"

    def backbone_image(self, frame: Image.Image) -> torch.Tensor:
        if self.impl == "loftup":   # torchvision Resize((s, s), BICUBIC) on the PIL frame: no aspect ratio kept
            return to_tensor(frame.resize((self.input[1], self.input[0]), Image.BICUBIC))
        x = to_tensor(frame)
        if tuple(x.shape[-2:]) == self.input:
            return x
        return F.interpolate(x[None], size=self.input, mode="bilinear", align_corners=False)[0]

    def guidance_image(self, image01: torch.Tensor) -> torch.Tensor:
        """The guidance at the requested size; resizing before the (per-channel affine) normalisation is the same as
        after it, as both resizes are weighted means."""
        return F.interpolate(image01[None], size=self.requested, mode=self.guidance_mode, align_corners=False)


@register("vos")
class VideoObjectSegmentation(Task):
    dataset_kinds = ("video",)
    dataset_hint = "a video dataset in the DAVIS layout (davis, davis_mini)"
    table = TableSpec(
        title="Video object segmentation (DAVIS-2017 semi-supervised, feature-affinity label propagation)",
        metrics=(Metric("j_mean", "J mean"), Metric("f_mean", "F mean"), Metric("jf", "J&F")),
        primary="jf",
        group_by=("backbone", "config.protocol.name", "config.task.propagation.implementation"),
        group_labels={"config.protocol.name": "protocol", "config.task.propagation.implementation": "propagation"},
        paper={"dinov2_s14": "loftup_table4"},
        position=30,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        check_propagation(cfg["task"].get("propagation"))

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, val_set = job.pipe, job.val_set
        prop = check_propagation(job.cfg.get("propagation"))
        patch = int(pipe.backbone.patch_size)
        save = bool(job.cfg.get("save_predictions", False)) and job.out_dir is not None
        per_sequence: List[Tuple[str, np.ndarray, np.ndarray]] = []
        seq_data: Dict[str, Dict[str, Any]] = {}
        prop_s: List[float] = []
        shapes: Dict[str, Any] = {}
        for i in bar(range(len(val_set)), desc="sequences"):
            item = val_set[i]
            seq = item["sequence"]
            gt, pred, info = self._sequence(pipe, item, seq, prop, patch, prop_s, job, save)
            j, f = evaluate_sequence(gt, pred, seq.name)
            per_sequence.append((seq.name, j, f))
            seq_data[seq.name] = {"frames": len(seq), "objects": int(j.shape[0]),
                                  "J": float(j.mean()) * 100 if j.size else None,
                                  "F": float(f.mean()) * 100 if f.size else None}
            shapes = shapes or info
        tables = aggregate(per_sequence)
        n_objects = len(tables["objects"])
        if n_objects == 0:
            raise RunFailed(f"{getattr(val_set, 'name', 'the dataset')}: no sequence has an object in its first "
                            "annotation, so there is nothing to score; check the annotations and dataset.val_split")
        g = tables["global"]
        metrics: Dict[str, Any] = {
            "jf": g["J&F-Mean"] * 100, "j_mean": g["J-Mean"] * 100, "f_mean": g["F-Mean"] * 100,
            "j_recall": g["J-Recall"] * 100, "j_decay": g["J-Decay"] * 100,
            "f_recall": g["F-Recall"] * 100, "f_decay": g["F-Decay"] * 100,
            "per_object": {name: {"J": float(tables["per_object"]["J-Mean"][k]) * 100,
                                  "F": float(tables["per_object"]["F-Mean"][k]) * 100}
                           for k, name in enumerate(tables["objects"])},
        }
        preset = (job.full_cfg.get("protocol") or {}).get("name")
        data = {"n_sequences": len(val_set), "n_objects": n_objects,
                "n_frames": sum(d["frames"] for d in seq_data.values()),
                "n_scored_frames": sum(max(0, d["frames"] - 2) for d in seq_data.values()),
                "protocol": preset, "propagation": prop["implementation"],
                "propagation_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in prop.items()},
                "metric": "davis2017-evaluation semi-supervised (frames 1..T-2, J/F per object, mean over objects)",
                "per_sequence": seq_data, **shapes}
        out = {"metrics": metrics, "timing": {"propagation_ms": median_ms(prop_s)}, "data": data}
        if save:
            out["artefacts"] = {"predictions": str(job.out_dir / "predictions")}
        return out

    def _sequence(self, pipe, item: Mapping[str, Any], seq, prop: Mapping[str, Any], patch: int,
                  prop_s: List[float], job: Job, save: bool) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """(ground truth (T, H0, W0), prediction (T, H0, W0), the sizes used) of one sequence."""
        first = seq.annotation(0)
        if (first == VOID).any():
            raise UpbenchError(f"{seq.annotations[0]}: the first annotation has void ({VOID}) pixels; propagation "
                               "takes object ids 0..K only: set them to 0 (background) in that file")
        original = (int(first.shape[0]), int(first.shape[1]))
        geo = Geometry(prop, patch, original)
        gts, preds = [first], [first]
        propagation = None
        grid: Size = (0, 0)
        for t in range(len(seq)):
            frame = seq.image(t)
            if (frame.height, frame.width) != original:
                raise UpbenchError(f"{seq.frames[t]}: {frame.width}x{frame.height} px, but the first annotation of "
                                   f"'{seq.name}' is {original[1]}x{original[0]}; a sequence's frames and "
                                   "annotations must all have one size")
            if t > 0:
                ann = seq.annotation(t)
                if ann.shape != original:
                    raise UpbenchError(f"{seq.annotations[t]}: {ann.shape[1]}x{ann.shape[0]} px, but the frames of "
                                       f"'{seq.name}' are {original[1]}x{original[0]}; every annotation must have "
                                       "its frame's size")
                gts.append(ann)
            image01 = geo.backbone_image(frame)
            key = (item.get("source"), seq.name, seq.frame_names[t], prop["implementation"], tuple(image01.shape))
            feats, _ = pipe.features(image01, key)
            if t == 0:   # the label grid: the requested size, or the features' own for a method that keeps them
                grid = pipe.probe_size(tuple(feats.shape[-2:]), geo.requested, "features")
            hr = pipe.upsample(geo.guidance_image(image01), feats[None], grid)[0].float()
            started = time.perf_counter()
            if t == 0:
                propagation = LabelPropagation(hr, first_frame_labels(first, grid), prop["n_last_frames"],
                                               prop["radius"], prop["topk"], prop["temperature"])
                continue
            seg = propagation.step(hr)
            _, labels = hard_labels(seg, geo.prediction, original)
            prop_s.append(time.perf_counter() - started)
            preds.append(labels)
        if save:
            self._save(job.out_dir / "predictions" / seq.name, seq, preds)
        shapes = {"input_size": list(geo.input), "feature_grid": list(feats.shape[-2:]), "label_grid": list(grid),
                  "prediction_size": list(geo.prediction)}
        return np.stack(gts), np.stack(preds), shapes

    @staticmethod
    def _save(folder: Path, seq, labels: List[np.ndarray]) -> None:
        """The label maps as palette PNGs named after the frames (the DAVIS results layout)."""
        folder.mkdir(parents=True, exist_ok=True)
        palette = seq.palette()
        for name, lab in zip(seq.frame_names, labels):
            img = Image.fromarray(np.ascontiguousarray(lab, dtype=np.uint8))
            if palette:
                img.putpalette(palette)   # an "L" image with a palette becomes "P"; the indices are kept
            img.save(folder / f"{name}.png")
