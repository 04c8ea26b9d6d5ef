"""Figures that run models: the feature PCA (UPLiFT Fig. 10 / LoftUp Fig. 2), the iterative steps of UPLiFT / LiFT
(UPLiFT Fig. 10, bottom) and qualitative predictions from the probes finished runs saved."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .. import plotting
from ..config import resolve_device, to_container
from ..errors import UpbenchError
from ..pipeline import Pipeline, build_datasets, build_upsampler, get_backbone
from ..registry import TASKS, UPSAMPLERS


def _item(cfg: Mapping[str, Any], index: int) -> Dict[str, Any]:
    _, val = build_datasets(cfg["dataset"], disjoint=False)
    if not 0 <= index < len(val):
        raise UpbenchError(f"--image {index} is out of range: the validation split has {len(val)} images")
    return val[index]


def _pipe(cfg: Mapping[str, Any]) -> Pipeline:
    device = resolve_device(cfg.get("device", "auto"))
    backbone = get_backbone(cfg["backbone"], device)
    return Pipeline(backbone, build_upsampler(cfg["upsampler"], backbone, device), device,
                    guidance_norm=(cfg.get("task") or {}).get("guidance_norm", "upsampler"))


def pca(cfgs: Sequence[Mapping[str, Any]], out_dir: Path, index: int = 0) -> List[str]:
    """One image, its low-res backbone features and every configured upsampler's output at the image size, all
    projected on the first three principal directions of a PCA fitted on all of them together
    (``torch.pca_lowrank``), so one colour is one direction in feature space in every panel."""
    cfgs = [to_container(c) for c in cfgs]
    item = _item(cfgs[0], index)
    size = tuple(item["image"].shape[-2:])
    low, outs = None, []
    for cfg in cfgs:
        pipe = _pipe(cfg)
        feats, _ = pipe.item_features(item)
        low = feats if low is None else low
        outs.append((cfg["upsampler"]["name"], pipe.upsample(item["image"][None], feats[None], size)[0].cpu()))
    joint = plotting.JointPCA([low] + [o for _, o in outs])
    panels = [("image", plotting.to_display(item["image"])),
              (f"low-res {tuple(low.shape[-2:])}", joint.rgb(plotting.nearest_up(low, size)))]
    panels += [(name, joint.rgb(o)) for name, o in outs]
    bb = cfgs[0]["backbone"]["name"]
    return plotting.panels(panels, Path(out_dir) / f"pca_{bb}_{cfgs[0]['dataset']['name']}_{index}",
                           ncols=min(len(panels), 6),
                           title=f"Features of one {cfgs[0]['dataset']['name']} image ({bb}), one joint PCA")


def steps(cfgs: Sequence[Mapping[str, Any]], out_dir: Path, index: int = 0, n_steps: int = 4) -> List[str]:
    """For every iterative upsampler among ``cfgs``: each 2x step's features under one joint PCA (all steps of all
    methods), titled with the step's drift from the low-res features (see ``task=stability``)."""
    from torch.nn import functional as F

    cfgs = [to_container(c) for c in cfgs if getattr(UPSAMPLERS.get(to_container(c)["upsampler"]["name"]),
                                                       "iterative", False)]
    if not cfgs:
        raise UpbenchError("no iterative upsampler among those chosen (iterative: "
                           + ", ".join(n for n, c in UPSAMPLERS.items() if c.iterative) + ")")
    item = _item(cfgs[0], index)
    rows, maps, low = [], [], None
    for cfg in cfgs:
        pipe = _pipe(cfg)
        feats, _ = pipe.item_features(item)
        low = feats if low is None else low
        with torch.inference_mode():
            outs = [o[0].cpu() for o in pipe.upsampler.forward_steps(pipe.guidance(item["image"][None]),
                                                                     feats[None].to(pipe.device), n_steps)]
        drifts = [float((1 - F.cosine_similarity(F.adaptive_avg_pool2d(o[None].float(), tuple(feats.shape[-2:]))[0],
                                                 feats.float(), dim=0)).mean()) for o in outs]
        rows.append((cfg["upsampler"]["name"], outs, drifts))
        maps += outs
    joint = plotting.JointPCA([low] + maps)
    size = tuple(rows[0][1][-1].shape[-2:])
    image = F.interpolate(item["image"][None].float(), size=size, mode="bilinear", antialias=True)[0]
    panels = []
    for name, outs, drifts in rows:
        panels += [(f"{name}: image", plotting.to_display(image)),
                   (f"low-res {tuple(low.shape[-2:])}", joint.rgb(low))]
        panels += [(f"step {k + 1} ({2 ** (k + 1)}x), drift {d:.3f}", joint.rgb(o))
                   for k, (o, d) in enumerate(zip(outs, drifts))]
    return plotting.panels(panels, Path(out_dir) / f"steps_{cfgs[0]['backbone']['name']}_{index}",
                           ncols=n_steps + 2, title="Iterative 2x steps under one joint PCA "
                           "(drift = mean 1 - cos to the low-res features after area downsampling)")


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC label colour map (bit-interleaved), extended to ``n`` classes; 255 (ignore) is black."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap[255] = 0
    return cmap


def predictions(rows: Sequence[Mapping[str, Any]], results: Path, out_dir: Path, n_images: int = 3) -> List[str]:
    """Per task (seg, depth) and protocol: a few validation images, their ground truth, and every method's
    prediction, drawn with the probe each finished run saved (``artefacts.probe``) -- no retraining."""
    from ..report.tables import order, UPSAMPLER_ORDER

    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for r in rows:
        probe = (r.get("artefacts") or {}).get("probe")
        if r.get("status") == "ok" and r.get("task") in ("seg", "depth") and probe and (Path(results) / probe).is_file():
            groups.setdefault(f"{r['task']}|{r['dataset']}|{r['backbone']}", []).append(r)
    paths: List[str] = []
    cmap = palette(256)
    for key, grp in sorted(groups.items()):
        task_name = grp[0]["task"]
        task = TASKS.get(task_name)
        first: Dict[str, Mapping[str, Any]] = {}
        for r in grp:   # one run per method (the first seed)
            first.setdefault(r["upsampler"], r)
        methods = order(first, UPSAMPLER_ORDER)
        cfg0 = first[methods[0]]["config"]
        _, val = build_datasets(cfg0["dataset"], disjoint=False)
        items = [val[i] for i in range(min(n_images, len(val)))]
        size = (val.img_size, val.img_size)
        columns: List[List[np.ndarray]] = [[plotting.to_display(it["image"]) for it in items]]
        titles = ["image", "ground truth"]
        if task_name == "seg":
            columns.append([cmap[it["label"].numpy()] for it in items])
        else:
            depth_max = max(float(it["depth"].max()) for it in items) or 1.0
            columns.append([_depth_rgb(it["depth"], depth_max) for it in items])
        for m in methods:
            r = first[m]
            pipe = _pipe(r["config"])
            preds = task.predict(pipe, str(Path(results) / r["artefacts"]["probe"]), items, size)
            if task_name == "seg":
                columns.append([cmap[p.numpy().astype(np.int64) % 256] for p in preds])
            else:
                columns.append([_depth_rgb(p, depth_max) for p in preds])
            titles.append(f"{m} ({r['metrics'].get('miou' if task_name == 'seg' else 'rmse', float('nan')):.2f})")
        panels = [(titles[c] if i == 0 else "", columns[c][i]) for i in range(len(items)) for c in range(len(columns))]
        metric = "mIoU" if task_name == "seg" else "RMSE"
        paths += plotting.panels(panels, Path(out_dir) / f"predictions_{task_name}_{grp[0]['dataset']}",
                                 ncols=len(columns), scale=1.9,
                                 title=f"{task_name} predictions on {grp[0]['dataset']} ({grp[0]['backbone']}); "
                                       f"titles: method ({metric} of the run)")
    return paths


def _depth_rgb(depth: torch.Tensor, depth_max: float) -> np.ndarray:
    """A depth map in the magma colour map on a shared range (0 = no ground truth, black)."""
    from matplotlib import colormaps

    d = depth.float().numpy()
    rgb = colormaps["magma"](np.clip(d / depth_max, 0, 1))[..., :3]
    rgb[d <= 0] = 0
    return rgb


def configs_for(upsamplers: Optional[Sequence[str]], overrides: Sequence[str],
                per_upsampler: Optional[Mapping[str, Sequence[str]]] = None) -> List[Dict[str, Any]]:
    """One composed config per upsampler (default: every registered upsampler with a config, except those the demo
    lists as not applying to backbone features, ``configs/demo.yaml`` ``skip``)."""
    import yaml

    from ..config import compose, config_dir, config_options

    skip = set((yaml.safe_load((config_dir() / "demo.yaml").read_text()) or {}).get("skip") or {})
    from ..report.tables import UPSAMPLER_ORDER, order

    names = order(upsamplers or [n for n in UPSAMPLERS.available() if n in config_options("upsampler")
                                 and n not in skip], UPSAMPLER_ORDER)
    return [to_container(compose([f"upsampler={n}", *overrides, *((per_upsampler or {}).get(n, []))]))
            for n in names]
