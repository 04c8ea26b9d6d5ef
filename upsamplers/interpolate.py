"""Parameter-free baselines, with the conventions of the JAFAR / NAF suites."""
from . import register
from .base import _Interpolate


@register("bilinear")
class Bilinear(_Interpolate):
    """``F.interpolate(mode="bilinear", align_corners=False)``, no antialias."""

    mode = "bilinear"


@register("nearest")
class Nearest(_Interpolate):
    """``F.interpolate(mode="nearest-exact")`` (NAF's nearest)."""

    mode = "nearest-exact"
