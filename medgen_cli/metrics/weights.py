"""Finding third-party weights without ever downloading them, and fingerprinting them.

Search order for a network's file (the first hit wins):

1. ``--weights PATH`` (a file, or a folder holding the expected file name); when given, it is the
   only place looked;
2. ``$MEDGEN_WEIGHTS_<NAME>`` (NAME upper-cased, ``-`` → ``_``, e.g. ``MEDGEN_WEIGHTS_RESNET50_IMAGENET``),
   then ``$MEDGEN_WEIGHTS_DIR/<file name>``;
3. the standard caches: torch hub (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub``) for
   torchvision-style files; the Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
   ``~/.cache/huggingface/hub``) read offline for hub repositories.

When nothing is found the ``InputError`` (exit 4) lists every place looked and how to provide the
file. sha256 of a weights file is memoised by (path, size, mtime) under the medgen cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError


def env_name(name: str) -> str:
    return "MEDGEN_WEIGHTS_" + name.upper().replace("-", "_")


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``; computed from the same environment variables while torch is not yet
    imported (the evaluation finds its weights before paying for that import)."""
    import sys

    if "torch" in sys.modules:
        try:
            return Path(sys.modules["torch"].hub.get_dir())
        except Exception:  # pragma: no cover - a half-imported torch
            pass
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def hf_cache_dirs() -> list[Path]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    out.append(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub")
    seen, uniq = set(), []
    for p in out:
        if str(p) not in seen:
            seen.add(str(p))
            uniq.append(p)
    return uniq


def hf_snapshots(repo: str) -> list[Path]:
    """Snapshot folders of a cached HF repo, the one ``refs/main`` names first."""
    found = []
    for cache in hf_cache_dirs():
        base = cache / ("models--" + repo.replace("/", "--"))
        ref = base / "refs" / "main"
        if ref.is_file():
            found.append(base / "snapshots" / ref.read_text().strip())
        if (base / "snapshots").is_dir():
            found += sorted(p for p in (base / "snapshots").iterdir() if p.is_dir())
    return found


def resolve(name: str, files: tuple[str, ...], explicit=None, hub_checkpoint: bool = True,
            hf_repo: str | None = None, how: str = "") -> Path:
    """Path of the first of ``files`` found in the search order (module docstring).

    ``files[0]`` is the file looked for; the others (e.g. a config) must sit beside it and are
    checked too. Returns the path of ``files[0]``.
    """
    looked: list[str] = []

    def hit(folder_or_file: Path) -> Path | None:
        p = Path(folder_or_file).expanduser()
        cand = p / files[0] if p.is_dir() else p
        looked.append(str(cand))
        if cand.is_file() and all((cand.parent / f).is_file() for f in files[1:]):
            return cand
        return None

    if explicit:  # an explicit path is the only place looked: never fall back silently to a cache
        found = hit(Path(explicit))
        if found is not None:
            return found
        raise InputError(f"weights for '{name}' not found at {explicit}", "--weights",
                         f"expected the file {files[0]}" + (f" with {', '.join(files[1:])} beside it" if files[1:] else ""),
                         details=[f"looked in: {p}" for p in looked])
    candidates: list[Path] = []
    if os.environ.get(env_name(name)):
        candidates.append(Path(os.environ[env_name(name)]))
    else:
        looked.append(f"${env_name(name)} (unset)")
    if os.environ.get("MEDGEN_WEIGHTS_DIR"):
        candidates.append(Path(os.environ["MEDGEN_WEIGHTS_DIR"]) / files[0])
    if hub_checkpoint:
        candidates.append(torch_hub_dir() / "checkpoints" / files[0])
    if hf_repo:
        snaps = hf_snapshots(hf_repo)
        candidates += snaps
        if not snaps:
            looked.append(f"{hf_cache_dirs()[0]}/models--{hf_repo.replace('/', '--')}/snapshots/* (not cached)")
    for c in candidates:
        found = hit(c)
        if found is not None:
            return found
    raise InputError(f"no weights for feature network '{name}' (medgen never downloads)", "--extractor " + name,
                     f"{how or 'download ' + files[0]} and pass --weights PATH, set ${env_name(name)}, "
                     f"or put it in {torch_hub_dir() / 'checkpoints'}",
                     details=[f"looked in: {p}" for p in looked])


def _memo(path: Path, size: int, mtime_ns: int) -> Path:
    from ..data.cache import default_cache_dir

    key = hashlib.sha256(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()
    return default_cache_dir() / "sha256" / f"{key}.json"


def known_sha256(path) -> str | None:
    """The memoised sha256 of a file as it is now (same absolute path, size and mtime), else None."""
    path = Path(path).resolve()
    st = path.stat()
    try:
        return json.loads(_memo(path, st.st_size, st.st_mtime_ns).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def remember_sha256(path, digest: str, size: int, mtime_ns: int) -> None:
    """Memoise ``digest`` for the file's bytes as they were at (size, mtime_ns); best effort."""
    path = Path(path).resolve()
    memo = _memo(path, size, mtime_ns)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path), "sha256": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass


def sha256_file(path) -> str:
    """sha256 hex of a file, memoised by (absolute path, size, mtime) in the medgen cache."""
    digest = known_sha256(path)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    remember_sha256(path, digest, st.st_size, st.st_mtime_ns)
    return digest


def load_pickled_state(path) -> dict:
    """A third-party pickled state dict, read with ``torch.load(weights_only=True)`` on the CPU."""
    import torch

    try:
        try:  # memory-mapped: tensors are read when first used (files written by torch.save since 1.6)
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (tar) format
    except Exception as exc:
        raise InputError(f"cannot read weights: {type(exc).__name__}: {exc}", path,
                         "the file must be a plain PyTorch state dict (weights_only loading)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError("weights file does not hold a state dict", path, "provide the original checkpoint file")
    return state
