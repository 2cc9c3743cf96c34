"""A cache of preprocessed volumes, so that repeated runs skip decompression, normalisation and resize.

The key is the sha256 of (absolute source path, file size, mtime_ns, JSON of the preprocessing
parameters): a source that changes size or modification time gets a new key and is recomputed.
Entries are plain ``.npy`` files (``np.save``; read with ``allow_pickle=False``) under
``cache_dir/<2 hex>/<key>.npy``, written atomically, so concurrent ranks and a read-only dataset
folder are fine. Stale entries are never deleted automatically (delete the folder to reclaim space).

``cache_dir``: None → ``$MEDGEN_CACHE`` else ``~/.cache/medgen``; False or "off" → no caching.
A cache folder that cannot be written only costs speed (one warning), never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("medgen")

FORMAT_VERSION = 1  # bump when the meaning of cached arrays changes
_warned: set[str] = set()


def default_cache_dir() -> Path:
    """``$MEDGEN_CACHE`` if set, else ``~/.cache/medgen``."""
    env = os.environ.get("MEDGEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medgen"


def resolve_cache_dir(cache_dir) -> Path | None:
    """None → default folder; False / "off" / "" → None (disabled); else the given folder."""
    if cache_dir is False or (isinstance(cache_dir, str) and cache_dir.lower() in ("", "off", "none")):
        return None
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def cache_key(source, params: dict) -> str:
    """sha256 hex of the source's identity (path, size, mtime_ns) and the parameters."""
    source = Path(source).resolve()
    st = source.stat()
    blob = json.dumps({"path": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "params": params, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.npy"


def _load(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # a torn or foreign file: recompute and replace it
        log.warning("cache entry unreadable, recomputing (%s): %s", path, exc)
        return None


def _store(path: Path, arr: np.ndarray) -> None:
    """np.save to a temporary file in the same folder, then rename; failures only warn once."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        if str(path.parent.parent) not in _warned:
            _warned.add(str(path.parent.parent))
            log.warning("cannot write the volume cache (%s): %s; continuing without it",
                        path.parent.parent, exc)
    finally:
        _discard(tmp)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def cached(source, params: dict, compute: Callable[[], np.ndarray], cache_dir=None) -> np.ndarray:
    """``compute()``'s array for (source, params), from the cache when present."""
    folder = resolve_cache_dir(cache_dir)
    if folder is None:
        return compute()
    path = entry_path(folder, cache_key(source, params))
    arr = _load(path)
    if arr is None:
        arr = compute()
        _store(path, arr)
    return arr
