"""Atomic file writes: every file upbench writes (result rows, checkpoints, caches, job records) appears whole or
not at all, also when jobs on several hosts write into one shared folder."""
from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_write(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path`` in one step, so a
    reader (or a job killed while writing) never sees a partial file.  The temporary name is unique per host,
    process and call, and ends in ``.tmp`` so no reader globbing for the real suffix picks it up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # only left if the block failed
