"""Backbone-feature cache: the backbone is frozen, so features are computed once per (backbone, image, size,
flip) and reused across epochs -- and across upsamplers when several run in one process (``upbench demo``).
An optional directory makes the cache persistent between runs."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from .files import atomic_write

Entry = Tuple[torch.Tensor, torch.Tensor]


class FeatureCache:
    def __init__(self, directory: Optional[str] = None, enabled: bool = True):
        self.enabled = enabled
        self.directory = os.path.expanduser(directory) if directory else None
        self._memory: Dict[Tuple, Entry] = {}
        self.hits = self.misses = 0

    def _path(self, key: Tuple) -> str:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
        return os.path.join(self.directory, f"{digest}.pt")

    def get(self, key: Tuple, compute: Callable[[], Entry]) -> Entry:
        if not self.enabled:
            self.misses += 1
            return compute()
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key) if self.directory else None
        if path and os.path.exists(path):
            entry = tuple(torch.load(path, weights_only=True))
            self.hits += 1
        else:
            entry = tuple(t.detach().cpu() for t in compute())
            self.misses += 1
            if path:
                with atomic_write(path) as tmp:
                    torch.save(list(entry), tmp)
        self._memory[key] = entry
        return entry


#: one cache per process, shared by every job the process runs
PROCESS_CACHE = FeatureCache()
