"""Open-vocabulary segmentation with ProxyCLIP (Lan et al., ECCV 2024; LoftUp Table 4): CLIP's last attention layer is
replaced by a "proxy" attention whose weights come from the vision foundation model's features -- here the backbone's
features upsampled by the upsampler under test -- and whose values are CLIP's own (interpolated bilinearly to the
proxy grid).  Each proxy token becomes a CLIP embedding; its class is the closest text embedding of the dataset's class
names.  mIoU over the validation set (as the seg probe counts it).

ProxyCLIP's ``custom_attn`` (mc-lan/ProxyCLIP ``open_clip/transformer.py``): the last block keeps only
``out_proj(A @ v)`` on ``ln_1(x)`` (no residual, no MLP), A = softmax over rows of S' where S = F^T F of the
L2-normalised proxy features F, S' = (S - beta mean(S)) gamma with negative entries set to -inf (beta 1.2, gamma 3);
then ``ln_post`` and the projection.  A row of S' with no non-negative entry (every similarity below beta x the mean)
would be all -inf (NaN in the original); here such a token attends to itself only.

CLIP weights come from the hub or a local folder in the transformers layout (``task.clip_model``); the preflight names
every missing weight in one line before anything runs."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
from torch.nn import functional as F

from upbench import hub
from upbench.errors import RunFailed, UpbenchError
from upbench.progress import bar
from upbench.protocols import Job, Metric, TableSpec, Task
from upbench.transforms import normalize

from . import register
from ._probe import resize_prediction
from ._seg_metrics import ConfusionMatrix

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def proxy_attention(proxy: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """(B, C, H, W) proxy features -> (B, HW, HW) ProxyCLIP attention weights (rows sum to 1)."""
    f = F.normalize(proxy.flatten(2).float(), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", f, f)
    sim = (sim - sim.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    dead = (sim < 0).all(-1, keepdim=True)   # rows the original would turn into NaN
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)[None]
    sim = sim.masked_fill((sim < 0) & ~(dead & eye), float("-inf"))
    sim = torch.where(dead & eye, torch.zeros_like(sim), sim)
    return torch.softmax(sim, dim=-1)


def load_clip(name_or_path: str, device: torch.device):
    """(CLIPModel, tokenizer) from a hub name or a local folder (transformers layout), eval mode on ``device``."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise UpbenchError("task=openvocab needs transformers: pip install 'upbench[gen]'") from None
    root = hub.require_weights("CLIP", name_or_path, hub.CLIP_FILES, "task.clip_model")
    model = CLIPModel.from_pretrained(str(root)).eval().requires_grad_(False).to(device)
    return model, AutoTokenizer.from_pretrained(str(root))


def text_embeddings(model, tokenizer, names: List[str], templates: List[str], device) -> torch.Tensor:
    """(K, D) unit text embeddings: per class the normalised mean of the normalised template embeddings
    (ProxyCLIP's query features)."""
    out = []
    for name in names:
        tok = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
        feats = model.get_text_features(**tok)
        feats = getattr(feats, "pooler_output", feats)
        feats = F.normalize(feats.float(), dim=-1).mean(0)
        out.append(F.normalize(feats, dim=0))
    return torch.stack(out)


def proxy_clip_embeddings(model, image01: torch.Tensor, proxy: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """(B, D, H', W') CLIP embeddings on the proxy grid of ``proxy`` (B, C, H', W') for images (B, 3, H, W) in [0, 1]."""
    vision = model.vision_model
    pixels = normalize(image01, CLIP_MEAN, CLIP_STD)
    x = vision.embeddings(pixels, interpolate_pos_encoding=True)
    x = vision.pre_layrnorm(x)
    layers = vision.encoder.layers
    for layer in layers[:-1]:
        out = layer(x, None) if _needs_mask_arg(layer) else layer(x)
        x = out[0] if isinstance(out, (tuple, list)) else out
    last = layers[-1]
    patch = int(vision.config.patch_size)
    h, w = image01.shape[-2] // patch, image01.shape[-1] // patch
    v = last.self_attn.v_proj(last.layer_norm1(x))[:, 1:]                       # (B, hw, D): CLIP's values
    B, _, D = v.shape
    Hp, Wp = proxy.shape[-2:]
    v = v.transpose(1, 2).reshape(B, D, h, w)
    v = F.interpolate(v, size=(Hp, Wp), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    attn = proxy_attention(proxy, beta, gamma).to(v.dtype)                      # the same weights for every head
    x = last.self_attn.out_proj(attn @ v)
    x = model.visual_projection(vision.post_layernorm(x))
    return x.transpose(1, 2).reshape(B, -1, Hp, Wp)


def _needs_mask_arg(layer) -> bool:
    import inspect

    params = inspect.signature(layer.forward).parameters
    return "attention_mask" in params and params["attention_mask"].default is inspect.Parameter.empty


@register("openvocab")
class OpenVocabSeg(Task):
    dataset_kinds = ("seg",)
    dataset_hint = "a segmentation dataset with class names (cocostuff, cityscapes, ade20k, voc, demo)"
    table = TableSpec(
        title="Open-vocabulary segmentation (ProxyCLIP)",
        metrics=(Metric("miou", "mIoU"),),
        group_by=("backbone", "config.protocol.name", "config.task.clip_model", "config.task.proxy_factor"),
        group_labels={"config.protocol.name": "protocol", "config.task.clip_model": "CLIP",
                      "config.task.proxy_factor": "proxy x"},
        paper={"dinov2_s14": "loftup_tables34"},
        position=34,
    )

    def preflight(self, cfg: Mapping[str, Any]) -> None:
        """Every weight the run needs (CLIP; the backbone's pretrained weights when it has no local file), checked and
        reported together in one line before anything is built."""
        task, bb = cfg["task"], cfg["backbone"]
        for key in ("beta", "gamma"):
            v = task.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UpbenchError(f"task.{key}={v}: expected a positive number (ProxyCLIP: beta 1.2, gamma 3.0)")
        f = task.get("proxy_factor")
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise UpbenchError(f"task.proxy_factor={f}: expected a positive integer (proxy grid = factor x the "
                               "backbone's feature grid)")
        templates = task.get("templates")
        if not isinstance(templates, (list, tuple)) or not templates or any("{}" not in str(t) for t in templates):
            raise UpbenchError(f"task.templates={templates}: expected a list of prompts with {{}} for the class name")
        problems = []
        clip = task.get("clip_model")
        if not clip:
            raise UpbenchError("task.clip_model is empty; set it to a hub name or a local CLIP folder")
        missing, _ = hub.missing_weights(str(clip), hub.CLIP_FILES)
        if missing:
            problems.append(f"CLIP ({', '.join(missing)}) from {clip} [set task.clip_model=/local/folder]")
        if bb.get("kind", "timm_vit") == "timm_vit" and bb.get("pretrained") and not bb.get("weights"):
            repo = f"timm/{bb.get('timm_name')}"
            files = {"backbone": [("model.safetensors", "pytorch_model.bin")]}
            miss_bb, _ = hub.missing_weights(repo, files)
            if miss_bb:
                problems.append(f"backbone {bb.get('name')} (model.safetensors) from {repo} "
                                "[set backbone.weights=/local/file]")
        if problems:
            raise UpbenchError("openvocab: weights missing: " + "; ".join(problems) + "; they cannot be downloaded "
                               "here (offline?): fetch them with huggingface-cli download where there is internet")

    def run(self, job: Job) -> Dict[str, Any]:
        pipe, device, val_set, cfg = job.pipe, job.device, job.val_set, job.cfg
        names = list(getattr(val_set, "class_names", ()) or [])
        num_classes, ignore = val_set.num_classes, val_set.ignore_index
        if len(names) != num_classes:
            raise UpbenchError(f"openvocab: dataset '{getattr(val_set, 'name', '?')}' has no class names for its "
                               f"{num_classes} classes; the text queries need them")
        model, tokenizer = load_clip(str(cfg["clip_model"]), device)
        beta, gamma, factor = float(cfg["beta"]), float(cfg["gamma"]), int(cfg["proxy_factor"])
        with torch.inference_mode():
            queries = text_embeddings(model, tokenizer, names, list(cfg["templates"]), device)
        scores = ConfusionMatrix(num_classes, ignore, device)
        grid = None
        for item in bar(pipe.items(val_set), total=len(val_set), desc="evaluate"):
            feats, _ = pipe.item_features(item)
            grid = tuple(feats.shape[-2:])
            # the upsampler is asked for factor x the grid (lowres keeps its own grid: the "Low-res" row)
            size = pipe.probe_size(grid, (grid[0] * factor, grid[1] * factor), "features")
            proxy = pipe.item_upsampled(item, False, size)[None].to(device)
            with torch.inference_mode():
                emb = proxy_clip_embeddings(model, item["image"][None].to(device), proxy, beta, gamma)
                logits = torch.einsum("bdhw,kd->bkhw", F.normalize(emb.float(), dim=1), queries)
                label = item["label"][None].to(device)
                pred = resize_prediction(logits, label.shape[-2:]).argmax(1)
                scores.update(pred, label)
        if int(scores.support().sum()) == 0:
            raise RunFailed(f"{getattr(val_set, 'name', 'the dataset')}: the validation labels have no labelled pixel "
                            "(all ignore); check the label files and dataset.val_split")
        return {
            "metrics": {"miou": scores.miou() * 100},
            "data": {"n_val": len(val_set), "img_size": val_set.img_size, "feature_grid": list(grid or ()),
                     "proxy_grid": list(size), "num_classes": num_classes, "n_templates": len(cfg["templates"]),
                     "clip_model": str(cfg["clip_model"])},
        }
