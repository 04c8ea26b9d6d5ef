"""upbench: a benchmark harness for feature upsamplers of vision foundation models."""
from .compat import install_torchvision_fallback as _install_torchvision_fallback

_install_torchvision_fallback()  # before anything imports torchvision or timm

__version__ = "0.1.0"

from .errors import UpbenchError  # noqa: E402

__all__ = ["UpbenchError", "__version__"]
