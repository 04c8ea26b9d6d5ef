"""Upsamplers (installed as ``upbench.upsamplers``).  Adding a method = one module here with ``@register("name")``
and one YAML in ``configs/upsampler/``; the registry (:data:`upbench.registry.UPSAMPLERS`) imports every module of
this package on first use, so nothing else changes.  The API follows timm's::

    from upbench import upsamplers
    upsamplers.available("up*", pretrained=True)                 # ['uplift', 'uplift_vae']
    model = upsamplers.create("jafar", pretrained=True, backbone="vit_small_patch14_dinov2.lvd142m")
    hr = model(image, features, output_size=(448, 448))
    upsamplers.pretrained_cfgs("jafar")                          # {tag: PretrainedCfg} of every official checkpoint

``backbone`` takes a timm name or an upbench backbone config name (``dinov2_s14``, ``dinov3_splus16``, ``demo``,
``sd15_vae``, ...): it sets ``in_channels`` / ``patch_size``, and with ``pretrained=True`` picks the official
checkpoint trained on it.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

from upbench import compat  # noqa: F401  (torchvision fallback before any method imports timm / torchvision)
from upbench.checkpoints import PretrainedCfg
from upbench.errors import UpbenchError
from upbench.registry import UPSAMPLERS

register = UPSAMPLERS.register


def available(pattern: Union[None, str, Sequence[str]] = None, pretrained: bool = False) -> List[str]:
    """Registered names, optionally only those matching ``pattern`` (fnmatch wildcards, or a list of patterns) and,
    with ``pretrained=True``, only methods with official weights."""
    names = UPSAMPLERS.available()
    if pattern is not None:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if pretrained:
        names = [n for n in names if get(n).pretrained_cfgs]
    return names


def get(name: str) -> Type[Any]:
    return UPSAMPLERS.get(name)


def pretrained_cfgs(name: str) -> Dict[str, PretrainedCfg]:
    """Every official checkpoint of upsampler ``name``: {tag: PretrainedCfg}, the default (``pretrained=True``
    without a backbone) first."""
    return dict(get(name).pretrained_cfgs)


class Backbone(NamedTuple):
    """What upbench knows about a backbone name: every name of the same features, channels and patch size."""

    names: Tuple[str, ...]
    channels: Optional[int]
    patch_size: Optional[int]


def backbone_info(name: str) -> Backbone:
    """Look ``name`` up among upbench's backbone configs (``configs/backbone/*.yaml``: file name, ``name``,
    ``timm_name``, ``name_or_path``) and the backbones of every official checkpoint."""
    from upbench.config import config_options, load_yaml

    for stem in config_options("backbone"):
        spec = load_yaml("backbone", stem)
        ids = tuple(dict.fromkeys(
            v for v in (stem, spec.get("name"), spec.get("timm_name"), spec.get("name_or_path"))
            if isinstance(v, str) and v and "${" not in v and v != "???"))
        if name in ids and isinstance(spec.get("channels"), int):
            return Backbone(ids, spec["channels"], spec.get("patch_size"))
    names, channels, patch = [name], None, None
    for _, cls in UPSAMPLERS.items():
        for cfg in cls.pretrained_cfgs.values():
            if name in cfg.backbones:
                names += [n for n in cfg.backbones if n not in names]
                channels = channels if channels is not None else cfg.in_channels
                patch = patch if patch is not None else cfg.patch_size
    return Backbone(tuple(names), channels, patch)


def _known_backbones() -> str:
    from upbench.config import config_options, load_yaml

    own = [s for s in config_options("backbone") if isinstance(load_yaml("backbone", s).get("channels"), int)]
    return f"upbench's {', '.join(own)}, or one an official checkpoint was trained on (upsamplers.pretrained_cfgs)"


def pretrained_cfg(name: str, backbone: Optional[str] = None, weights: Optional[str] = None
                   ) -> Optional[PretrainedCfg]:
    """The official checkpoint ``create(name, pretrained=True, backbone=..., weights=...)`` uses: the one named by
    ``weights`` (a tag), else the first one trained on ``backbone``, else the default; None for parameter-free
    methods.  Raises :class:`UpbenchError` naming the backbones with weights when there is none for ``backbone``."""
    cls = get(name)
    cfgs = cls.pretrained_cfgs
    if weights is not None and str(weights) in cfgs:
        cfg = cfgs[str(weights)]
        if backbone is not None and cfg.backbone is not None and \
                not set(backbone_info(backbone).names) & set(cfg.backbones):
            raise UpbenchError(f"{name}: weights '{weights}' were trained on {cfg.backbone}, not on backbone "
                               f"'{backbone}'; leave out weights= to pick the checkpoint for '{backbone}'")
        return cfg
    if not cfgs:
        if cls.parameter_free:
            return None
        raise UpbenchError(f"{name} has no official weights; methods with official weights: "
                           f"{', '.join(available(pretrained=True))}")
    if backbone is None:
        return next(iter(cfgs.values()))
    names = set(backbone_info(backbone).names)
    for cfg in cfgs.values():
        if names & set(cfg.backbones):
            return cfg
    tied = list(dict.fromkeys(c.backbone for c in cfgs.values() if c.backbone))
    free = [c.tag for c in cfgs.values() if not c.backbone]
    extra = f"; not tied to one backbone: {', '.join(free)} (pass weights='{free[0]}')" if free else ""
    raise UpbenchError(f"{name} has no official weights for backbone '{backbone}'; it has weights for: "
                       f"{', '.join(tied)}{extra}")


def create(name: str, pretrained: bool = False, backbone: Optional[str] = None, weights: Optional[str] = None,
           **kwargs: Any):
    """Build upsampler ``name``; ``kwargs`` go to its constructor (unknown ones are refused with the valid names).

    * ``pretrained=True``: the official weights (:func:`pretrained_cfg`), downloaded into the HF / torch hub caches;
      the model is configured for them (channels, patch size, constructor arguments, image normalisation) and
      ``model.pretrained_cfg`` records which.  ``False`` (default): random initialisation.
    * ``backbone``: a timm or upbench backbone name; sets ``in_channels`` / ``patch_size`` (explicit ones win) and
      picks the checkpoint trained on it.
    * ``weights``: an official tag (configures the model as ``pretrained=True`` would) or a local file / a folder
      written by ``save_pretrained`` (with ``pretrained=True``: loaded instead of the download, e.g. offline).
    """
    cls = get(name)
    is_tag = weights is not None and str(weights) in cls.pretrained_cfgs
    cfg = pretrained_cfg(name, backbone, str(weights) if is_tag else None) if (pretrained or is_tag) else None
    bb = backbone_info(backbone) if backbone is not None else None
    defaults: Dict[str, Any] = {}
    if cfg is not None:
        defaults = {"in_channels": cfg.in_channels, "patch_size": cfg.patch_size, **cfg.kwargs}
        given = kwargs.get("in_channels")
        if given is not None and cfg.in_channels is not None and int(given) != cfg.in_channels:
            raise UpbenchError(f"{name}: in_channels={given} does not fit the official weights '{cfg.tag}' "
                               f"({cfg.in_channels} channels, backbone {cfg.backbone})")
    if bb is not None:
        if bb.channels is None and kwargs.get("in_channels") is None and defaults.get("in_channels") is None \
                and not cls.parameter_free:
            raise UpbenchError(f"unknown backbone '{backbone}': pass in_channels= and patch_size= too, or use a known "
                               f"backbone: {_known_backbones()}")
        for key, value in (("in_channels", bb.channels), ("patch_size", bb.patch_size)):
            if defaults.get(key) is None:
                defaults[key] = value
    args = {k: v for k, v in defaults.items() if v is not None and k not in kwargs}
    norm = None if cfg is None else (tuple(cfg.image_mean), tuple(cfg.image_std))
    if norm == (tuple(cls.image_mean), tuple(cls.image_std)) or "image_mean" in kwargs:
        norm = None   # the class's own normalisation already is the checkpoint's, or the caller chose one
    if norm is not None and "image_mean" in accepted_arguments(cls)[0]:
        args.update(image_mean=norm[0], image_std=norm[1])   # recorded by save_pretrained
        norm = None
    model = cls(**args, **kwargs)
    if cfg is not None:
        model.pretrained_cfg = cfg
    if norm is not None:
        model.image_mean, model.image_std = norm
    if weights is not None:
        model.load_official(str(weights))
    elif cfg is not None:
        model.load_official(cfg.tag)
    return model


def for_official_method(method: str) -> Type[Any]:
    """The class that reproduces an official implementation named ``method`` (golden files' ``method`` field)."""
    for _, cls in UPSAMPLERS.items():
        if method in getattr(cls, "official_methods", ()):
            return cls
    raise UpbenchError(f"no registered upsampler reproduces the official method '{method}'")


from .base import Upsampler, accepted_arguments  # noqa: E402

__all__ = ["Upsampler", "UPSAMPLERS", "PretrainedCfg", "Backbone", "register", "available", "get", "create",
           "pretrained_cfgs", "pretrained_cfg", "backbone_info", "for_official_method"]
