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


@register("lowres")
class LowRes(_Interpolate):
    """No upsampling: the probe reads the low-resolution features and its logits are resized to the labels (LoftUp's
    "Low-res" row).  Asked for another size it upsamples bilinearly, so it still follows the contract; tasks that
    honour :meth:`native_output_size` (``task.resize_at=logits|labels``) never ask."""

    mode = "bilinear"
    always_native = True   # a probe always reads it at its own size, whatever task.resize_at says

    def native_output_size(self, feature_size, output_size):
        return (int(feature_size[0]), int(feature_size[1]))


@register("input2x")
class Input2x(_Interpolate):
    """The "2x larger input" baseline (LoftUp Table 6; LiFT's pseudo ground truth): the backbone sees the image at
    twice its side, and its (4x as many) features are upsampled bilinearly.  The pipeline honours
    :attr:`backbone_scale`; the row's ``backbone_ms`` records the larger backbone's cost."""

    mode = "bilinear"
    backbone_scale = 2.0
