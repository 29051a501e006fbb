"""A small on-disk cache for poisoned tensors, keyed by a hash of what produced them.

Entries are `torch.save`d dicts of tensors, written atomically (temp file + rename) and read with
`weights_only=True`; an unreadable entry is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def fingerprint(obj: Any) -> str:
    """A stable hex digest of nested dicts/lists/scalars/tensors."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(json.dumps(str(k)).encode())
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(o, sort_keys=True, default=str).encode())

    feed(obj)
    return h.hexdigest()[:20]


def cached(cache_dir: str | Path | None, key: Any, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Return `build()`, reusing the copy saved under `cache_dir` for the same key."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{fingerprint(key)}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is rebuilt
            warnings.warn(f"ignoring unreadable cache entry {path} ({err}); rebuilding it", stacklevel=2)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value
