"""Backbone-feature cache: the backbone is frozen, so features are computed once per key and reused across epochs,
and across upsamplers when several jobs run in one process (``upbench demo``, a local multirun).  An optional
directory makes the cache persistent between runs.

Keys are made by the pipeline (:meth:`upbench.pipeline.Pipeline.features`): the backbone's identity (a hash of its
full config, weight files included), the dataset's identity, the item, its size and flip -- so two backbones with
different weights, or two datasets with the same item names, never share an entry."""
from __future__ import annotations

import hashlib
import logging
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
        self.hits = self.misses = self.unreadable = 0

    def _path(self, key: Tuple) -> str:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
        return os.path.join(self.directory, f"{digest}.pt")

    def _read(self, path: str) -> Optional[Entry]:
        """A stored entry, or None when the file is unreadable (truncated, not ours): it is then recomputed."""
        try:
            entry = torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001  (a corrupt file fails in many ways; it is recomputed and replaced)
            entry = None
        if (isinstance(entry, (list, tuple)) and len(entry) == 2
                and all(isinstance(t, torch.Tensor) for t in entry)):
            return entry[0], entry[1]
        self.unreadable += 1
        if self.unreadable == 1:   # once per cache: a damaged folder would otherwise print a line per item
            logging.getLogger("upbench").warning(
                f"upbench: warning: unreadable feature-cache file {path}; recomputing it (and any other damaged "
                f"entries of {self.directory})")
        return None

    def get(self, key: Tuple, compute: Callable[[], Entry]) -> Entry:
        if not self.enabled:
            self.misses += 1
            return compute()
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self._path(key) if self.directory else None
        entry = self._read(path) if path and os.path.exists(path) else None
        if entry is not None:
            self.hits += 1
        else:
            entry = tuple(t.detach().cpu() for t in compute())  # type: ignore[assignment]
            self.misses += 1
            if path:
                with atomic_write(path) as tmp:
                    torch.save(list(entry), tmp)
        self._memory[key] = entry
        return entry


#: one cache per process, shared by every job the process runs
PROCESS_CACHE = FeatureCache()
