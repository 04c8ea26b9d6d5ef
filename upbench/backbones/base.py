"""The base class of every frozen backbone (see :class:`upbench.protocols.Backbone` for the contract)."""
from __future__ import annotations

from typing import Tuple

from torch import nn


class Backbone(nn.Module):
    """Contract: ``forward(image) -> (features (B,C,h,w), prefix_tokens (B,n,C))`` on images normalised with
    :attr:`mean` / :attr:`std`; ``h = H // patch_size``.  :attr:`identity` (a hash of the full config the backbone
    was built from) is set by the core when it builds one; caches key on it."""

    name: str
    channels: int
    patch_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    identity: str = ""
