"""Config plumbing shared by every layer: plain containers from Hydra configs, devices, the packaged config folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from .errors import UpbenchError


def register_resolvers() -> None:
    """upbench's OmegaConf resolvers (idempotent).  ``${join:${train.depths}}`` -> ``1-2-3``: a list as a path-safe
    name, so a multirun over lists can give each job its own folder."""
    from omegaconf import OmegaConf

    def join(values: Any, sep: str = "-") -> str:
        if isinstance(values, str) or not hasattr(values, "__iter__"):
            return str(values)
        return sep.join(str(v) for v in values)

    def shared_default() -> str:
        """``../shared`` beside the source checkout upbench runs from (where the offline assets live), whatever the
        working directory; ``UPBENCH_SHARED_DIR`` overrides it in ``paths.shared``."""
        return str(config_dir().resolve().parent.parent / "shared")

    if not OmegaConf.has_resolver("join"):
        OmegaConf.register_new_resolver("join", join)
    if not OmegaConf.has_resolver("upbench_shared"):
        OmegaConf.register_new_resolver("upbench_shared", shared_default)


def to_container(cfg: Any) -> Dict[str, Any]:
    """A resolved plain dict from a Hydra ``DictConfig`` (or any mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        register_resolvers()

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def resolve_device(name: Any):
    """``auto`` -> cuda when available, else cpu; ``cuda[:i]`` must exist."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise UpbenchError(f"device={name}: not a device; use auto, cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UpbenchError(f"device={name}: upbench runs on cpu, cuda or mps; use device=auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UpbenchError(f"device={name} requested but CUDA is not available; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UpbenchError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                               f"cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UpbenchError(f"device={name} requested but MPS is not available; use device=cpu")
    return device


def package_dir(package: str) -> Path:
    """The folder of an installed upbench package (``upbench.configs``, ``upbench.slurm``), wheel or editable."""
    import importlib

    module = importlib.import_module(package)
    return Path(list(module.__path__)[0])


def config_dir() -> Path:
    return package_dir("upbench.configs")


def config_options(group: str) -> List[str]:
    """The YAML names of a config group (``task``, ``upsampler``, ``sweep``, ...; ``cluster``: the SLURM presets)."""
    root = package_dir("upbench.slurm") if group == "cluster" else config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def load_yaml(group: str, name: str) -> Dict[str, Any]:
    """One packaged config file as a plain dict (e.g. an upsampler's defaults); {} when it does not exist."""
    import yaml

    path = config_dir() / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """The Hydra config ``config_name`` of the packaged configs with ``overrides`` applied (a ``DictConfig``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_resolvers()
    with initialize_config_module(config_module="upbench.configs", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
