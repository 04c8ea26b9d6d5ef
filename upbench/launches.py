"""Count what a forward pass would launch on an accelerator: kernels, host-device synchronisations, host-to-device
copies.  Launch-bound code (thousands of tiny ops) and hidden syncs (``.item()``, ``.tolist()``, boolean indexing,
tensors built on the host) are invisible in CPU timings but dominate on a GPU; this counter makes them a number that
tests can bound.

Every ATen op that reaches the dispatcher is seen (:class:`torch.utils._python_dispatch.TorchDispatchMode`).  Ops
that launch no kernel (views, ``empty``, metadata) are not counted.  Run it on the ``meta`` device to count a GPU
path without a GPU and without computing anything: there any read of a tensor's values fails, which is exactly a
device sync; :func:`count_launches` records it instead of failing where it can."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Counter, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that allocate or describe without running a kernel
_FREE = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_unsafe_view", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "result_type",
}
# ops whose result size depends on the data (or that read a value): the host waits for the device
_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
         "unique_dim", "item", "equal", "is_nonzero", "allclose"}


def _name(func: Any) -> str:
    return func._schema.name.split("::")[-1]


@dataclasses.dataclass
class LaunchCount:
    """What one call dispatched: ``kernels`` (ops that run device code), ``syncs`` (host waits for the device),
    ``host_copies`` (host-to-device copies of tensors built on the host), and the kernel ops by name."""

    kernels: int = 0
    syncs: int = 0
    host_copies: int = 0
    ops: Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> Dict[str, Any]:
        return {"kernels": self.kernels, "syncs": self.syncs, "host_copies": self.host_copies,
                "top_ops": dict(self.ops.most_common(8))}


def _devices(args: Any) -> set:
    flat, _ = tree_flatten(args)
    return {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter(device) as c: fn()`` then ``c.count``; ``device`` is where the work is meant to run (a
    host tensor of one or more dimensions entering an op there is a host-to-device copy)."""

    def __init__(self, device: Any):
        super().__init__()
        self.device = torch.device(device)
        self.count = LaunchCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        c = self.count
        if name in _SYNC or (name == "index" and _bool_index(args)):
            c.syncs += 1
        elif self.device.type != "cpu" and name not in _FREE and "cpu" in _devices((args, kwargs)):
            c.host_copies += 1   # a host tensor entering device work (a copy, or an op that would need one)
        inert = name in ("dropout", "feature_dropout", "alpha_dropout") and len(args) > 2 and not args[2]
        if name not in _FREE and name not in _SYNC and not func.is_view and not inert:
            c.kernels += 1
            c.ops[name] += 1
        if self.device.type == "meta" and name in _SYNC:
            raise DeviceSync(f"{name} reads tensor values on the host (a device sync)")
        return func(*args, **kwargs)


class DeviceSync(RuntimeError):
    """Raised on the meta device where an op needs the values (a sync on a real device)."""


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())


def count_launches(fn: Callable[[], Any], device: Any = "meta") -> LaunchCount:
    """Run ``fn()`` under a :class:`LaunchCounter`; on ``meta``, a value read ends the call with ``syncs`` >= 1."""
    counter = LaunchCounter(device)
    try:
        with counter:
            fn()
    except DeviceSync:
        if counter.count.syncs == 0:
            raise
    except (RuntimeError, NotImplementedError) as err:  # Tensor.item() / tolist() refuse meta tensors up front
        if torch.device(device).type != "meta" or "meta" not in str(err):
            raise
        counter.count.syncs += 1
    return counter.count


def forward_launches(model: torch.nn.Module, image_shape: tuple, features_shape: tuple, output_size: tuple,
                     device: Any = "meta", dtype: Optional[torch.dtype] = None) -> LaunchCount:
    """Launches of one inference forward of an upsampler at these shapes, on ``device`` (default ``meta``)."""
    device = torch.device(device)
    model = model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    dt = dtype or torch.float32
    image = torch.zeros(image_shape, device=device, dtype=dt)
    feats = torch.zeros(features_shape, device=device, dtype=dt)
    model.eval()
    with torch.inference_mode():
        model(image, feats, output_size)  # warm-up: caches (folded weights, resize weights) are built once
        return count_launches(lambda: model(image, feats, output_size), device)
