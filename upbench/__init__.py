"""upbench: a benchmark harness for feature upsamplers of vision foundation models.

Importing ``upbench`` is cheap (no torch): Hydra imports every ``hydra_plugins`` module of an environment at start-up,
and ``upbench --help`` should answer at once.  The parts that need torch import it themselves.

Layers (each imports only the ones below it; ``tests/test_layers.py`` checks this):

  L3  upbench.cli, upbench.completion, hydra_plugins.upbench_launcher   thin; import lazily
  L2  upbench.pipeline, runner, scaling, demo, report, viz, jobs   reach plugins only through registries
  L1  upbench.upsamplers, upbench.tasks, upbench.backbones, upbench.data   plugins; import L0 only
  L0  errors, registry, protocols, schema, results, files, checkpoints, cache, config, timing, transforms, hub,
      image_metrics, plotting, ...
"""
import sys as _sys

from .errors import UpbenchError

__version__ = "0.1.0"

__all__ = ["UpbenchError", "__version__"]


class _TorchvisionGuard:
    """Runs :func:`upbench.compat.install_torchvision_fallback` right before the first ``import torchvision`` (which
    timm does), so ``import upbench; import timm`` works on a CPU torch with the CUDA-only torchvision wheel, without
    importing torch when upbench itself is imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            if cls in _sys.meta_path:
                _sys.meta_path.remove(cls)
            from .compat import install_torchvision_fallback

            install_torchvision_fallback()
        return None   # the normal finders do the import


if "torchvision" not in _sys.modules and _TorchvisionGuard not in _sys.meta_path:
    _sys.meta_path.insert(0, _TorchvisionGuard)
