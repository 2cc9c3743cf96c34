"""Sharded safetensors checkpoints: save atomically, verify before use, point, prune (CONTRACTS.md).

Layout of one step folder (``RUN/ckpt/step-00001000/``)::

    model.safetensors.index.json        {"metadata": {...}, "weight_map": {tensor: shard file}}
    model-00001-of-0000n.safetensors    shards of at most ``shard_bytes``; a tensor is never split
    ema.safetensors.index.json, ema-*   when an "ema" group is given (any other group likewise)
    optimizer.safetensors.index.json, optimizer-*   a flattened optimizer state_dict
    trainer_state.json                  step, epoch and whatever the trainer passes (JSON)

Index ``metadata`` (Hugging Face index format, extra keys are ours): ``format`` ("medgen/1"),
``group``, ``step``, ``epoch``, ``total_size``, ``config`` (the resolved config as a JSON *string*),
``shards`` ({file: {"sha256", "bytes"}}) and, for the optimizer group only, ``optimizer``: the JSON
skeleton of the state_dict produced by :func:`flatten_optimizer` (param_groups with their
hyperparameters, which tensor holds which per-parameter state). Keeping the skeleton next to its
tensors makes the optimizer files describe themselves; trainer_state.json stays the trainer's own.
Every shard's safetensors header metadata carries ``format``, ``group``, ``step``, ``shards_total``
and ``config``, so a single-shard ``.safetensors`` file copied out of a run still describes itself.

Saving writes everything under ``ckpt/.tmp-<random>/``, fsyncs the files and the folder, renames it
to ``step-XXXXXXXX`` (an existing folder of that step is moved aside first and deleted afterwards),
fsyncs ``ckpt/`` and atomically replaces the ``LATEST`` pointer. A folder whose model index is
missing, unreadable or names a missing shard is never used; shard sizes and sha256 are checked
against the index before any tensor is read. Nothing here unpickles (no ``torch.load``).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import InputError, ResourceError, UsageError, did_you_mean

FORMAT = "medgen/1"
DEFAULT_SHARD_BYTES = 1 << 30
INDEX_SUFFIX = ".safetensors.index.json"
TRAINER_STATE = "trainer_state.json"
POINTERS = ("LATEST", "BEST")
STEP_RE = re.compile(r"^step-(\d{8,})$")
_GROUP_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_JSON_TENSOR_LIMIT = 1 << 20  # bytes of one tensor inside trainer_state.json (RNG states are ~5 KB)
log = logging.getLogger("medgen.checkpoint")


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``weights`` says which weights ``model_state`` holds: "ema" or "raw"."""

    step_dir: Path  # the step folder, or the single .safetensors file
    step: int | None
    epoch: int | None
    config: dict
    model_state: dict[str, torch.Tensor]
    weights: str
    trainer_state: dict = field(default_factory=dict)
    groups: tuple[str, ...] = ()


def step_dir_name(step: int) -> str:
    """``step-00001000`` for step 1000."""
    return f"step-{int(step):08d}"


# --------------------------------------------------------------------------- small file operations


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically: write a temporary sibling, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _token() -> str:
    """A random folder suffix from os.urandom (never the global RNG; CONTRACTS.md "Randomness")."""
    return secrets.token_hex(6)


# --------------------------------------------------------------------------- sharding


def _standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors that own their whole storage: views, non-contiguous and tied tensors are copied."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
        if not whole or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    """Names per shard, in order; a shard closes before it would exceed ``shard_bytes``."""
    plan, size = [[]], 0
    for name, t in tensors.items():
        if plan[-1] and size + t.nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += t.nbytes
    return plan


def _shard_name(group: str, k: int, n: int) -> str:
    return f"{group}-{k:05d}-of-{n:05d}.safetensors"


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict:
    """Write one shard, fsync it, and return its index entry (sha256 and size of the file on disk)."""
    save_file(_standalone(tensors), str(path), metadata=header)
    _fsync_file(path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _write_group(folder: Path, group: str, tensors: dict[str, torch.Tensor], info: dict,
                 shard_bytes: int, extra: dict | None = None) -> None:
    """Write ``group`` as shards plus its index. ``info``: step, epoch, config (JSON string)."""
    plan = _plan_shards(tensors, shard_bytes)
    header = {"format": FORMAT, "group": group, "step": str(info["step"]),
              "shards_total": str(len(plan)), "config": info["config"]}
    shards, weight_map = {}, {}
    for k, names in enumerate(plan, start=1):
        fname = _shard_name(group, k, len(plan))
        shards[fname] = _write_shard(folder / fname, {n: tensors[n] for n in names}, header)
        weight_map.update(dict.fromkeys(names, fname))
    meta = {"format": FORMAT, "group": group, "step": info["step"], "epoch": info["epoch"],
            "total_size": sum(t.nbytes for t in tensors.values()), "config": info["config"],
            "shards": shards, **(extra or {})}
    index = {"metadata": meta, "weight_map": weight_map}
    _write_text(folder / f"{group}{INDEX_SUFFIX}", json.dumps(index, indent=2))


# --------------------------------------------------------------------------- optimizer state


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _encode(value, path: str, tensors: dict):
    """JSON skeleton of ``value``; tensors move to ``tensors[path]``. Dicts and tuples are tagged so
    that int keys and tuples (AdamW's betas) come back exactly; plain JSON objects never appear."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two optimizer-state entries flatten to the same name '{path}'")
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[_check_dict_key(k, path), _encode(v, _join(path, k), tensors)]
                             for k, v in value.items()]}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at '{path}' of an optimizer state "
                    "(expected tensors, numbers, strings, None, lists, tuples or dicts)")


def _check_dict_key(key, path: str):
    if isinstance(key, (str, int)):
        return key
    raise TypeError(f"optimizer-state key {key!r} at '{path}' is a {type(key).__name__}, expected str or int")


def _decode(node, tensors: dict):
    """Inverse of :func:`_encode`."""
    if isinstance(node, list):
        return [_decode(n, tensors) for n in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        name = node["__tensor__"]
        if name not in tensors:
            raise InputError(f"optimizer index names tensor '{name}' that no optimizer shard holds",
                             hint="the optimizer files are inconsistent; resume from another step")
        return tensors[name]
    if "__tuple__" in node:
        return tuple(_decode(n, tensors) for n in node["__tuple__"])
    if "__dict__" in node:
        return {k: _decode(v, tensors) for k, v in node["__dict__"]}
    raise InputError(f"optimizer index holds an unknown entry {sorted(node)[:3]}",
                     hint="the optimizer files were not written by this medgen; resume from another step")


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into flat tensors (``state.0.exp_avg``, ``state.0.step``, …)
    and a JSON skeleton (param_groups with hyperparameters, non-tensor values, tensor references).
    dtypes are kept; :func:`unflatten_optimizer` restores the state_dict exactly."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(state_dict, "", tensors)


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild the state_dict that :func:`flatten_optimizer` split."""
    return _decode(meta, tensors)


# --------------------------------------------------------------------------- trainer_state.json


def _json_default(obj):
    """Small tensors (RNG states) inside trainer_state become tagged base64 objects."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.nbytes > _JSON_TENSOR_LIMIT:
            raise ValueError(f"trainer_state holds a {t.nbytes}-byte tensor; put tensors above "
                             f"{_JSON_TENSOR_LIMIT} bytes in a checkpoint group instead")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "base64": base64.b64encode(raw).decode("ascii")}}
    raise TypeError(f"trainer_state value of type {type(obj).__name__} is not JSON serialisable")


def _json_hook(obj: dict):
    spec = obj.get("__tensor__")
    if not isinstance(spec, dict) or len(obj) != 1:
        return obj
    dtype, raw = getattr(torch, spec["dtype"]), base64.b64decode(spec["base64"])
    if not raw:
        return torch.empty(spec["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(spec["shape"])


def _read_trainer_state(step_dir: Path) -> dict:
    path = step_dir / TRAINER_STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_hook=_json_hook)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InputError(f"unreadable {TRAINER_STATE}: {exc}", path,
                         hint="resume from another step (--which step-N)") from exc


# --------------------------------------------------------------------------- saving


def _is_optimizer_state(value) -> bool:
    return isinstance(value, dict) and set(value) == {"state", "param_groups"}


def _check_groups(groups: dict) -> None:
    if "model" not in groups:
        raise ValueError(f"a checkpoint needs a 'model' group, got groups {sorted(groups)}")
    for name, tensors in groups.items():
        if not _GROUP_RE.match(name):
            raise ValueError(f"group name '{name}' must match {_GROUP_RE.pattern}")
        if _is_optimizer_state(tensors):
            continue
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"group '{name}' holds non-tensor values at {bad[:3]}; expected tensors "
                            "(or, for an optimizer, its state_dict())")


def _write_step(folder: Path, info: dict, groups: dict, trainer_state: dict, shard_bytes: int) -> None:
    """Fill ``folder`` with every group, the trainer state, and fsync the folder."""
    for name, tensors in groups.items():
        extra = None
        if _is_optimizer_state(tensors):
            tensors, skeleton = flatten_optimizer(tensors)
            extra = {"optimizer": skeleton}
        _write_group(folder, name, tensors, info, shard_bytes, extra)
    state = {**trainer_state, "step": info["step"], "epoch": info["epoch"]}
    _write_text(folder / TRAINER_STATE, json.dumps(state, indent=1, default=_json_default))
    _fsync_dir(folder)


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".tmp-replaced-{_token()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir, step: int, epoch: int, groups: dict[str, dict], trainer_state: dict,
                    config_json: str, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``RUN/ckpt/step-XXXXXXXX/`` atomically, point ``LATEST`` at it, return its path.

    ``groups`` maps a group name to a ``{name: tensor}`` dict ("model" is required; "ema" when EMA is
    on); a value that is an optimizer ``state_dict()`` (keys ``state`` and ``param_groups``) is
    flattened with :func:`flatten_optimizer`, its skeleton kept in that group's index metadata.
    ``trainer_state`` must be JSON-serialisable apart from small tensors (tuples come back as lists).
    A full disk is a ResourceError (exit 5); the partial folder is removed.
    """
    _check_groups(groups)
    json.loads(config_json)  # a ValueError here is a bug in the caller: the config must be JSON
    ckpt = Path(run_dir) / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp, final = ckpt / f".tmp-{_token()}", ckpt / step_dir_name(step)
    tmp.mkdir()
    info = {"step": int(step), "epoch": int(epoch), "config": config_json}
    try:
        _write_step(tmp, info, groups, trainer_state, shard_bytes)
        _install(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise ResourceError(f"no space left to save checkpoint {final.name}", ckpt,
                                hint=f"free disk space, or prune old steps in {ckpt}") from exc
        raise
    set_pointer(run_dir, "LATEST", final)
    return final


# --------------------------------------------------------------------------- validity and pointers


def _index_ok(index) -> bool:
    """The index has our format, a weight_map, and shard entries that are plain file names."""
    meta = index.get("metadata") if isinstance(index, dict) else None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(meta, dict) and isinstance(wmap, dict) and meta.get("format") == FORMAT):
        return False
    shards = meta.get("shards")
    return (isinstance(shards, dict) and all(_SHARD_RE.match(s) for s in shards)
            and set(wmap.values()) <= set(shards))


def _read_index(folder: Path, group: str) -> dict | None:
    """The parsed index of ``group`` in ``folder``, or None when missing or not ours/unreadable."""
    try:
        index = json.loads((folder / f"{group}{INDEX_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if _index_ok(index) else None


def _is_complete(folder: Path) -> bool:
    """A model index that parses and whose shard files all exist (contents are checked at load)."""
    index = _read_index(folder, "model")
    return index is not None and all((folder / s).is_file() for s in index["metadata"]["shards"])


def is_valid_step_dir(path) -> bool:
    """True for a ``step-XXXXXXXX`` folder that is complete (never a ``.tmp-*`` or half-written one)."""
    path = Path(path)
    return bool(STEP_RE.match(path.name)) and path.is_dir() and _is_complete(path)


def valid_step_dirs(ckpt_dir) -> list[Path]:
    """The valid step folders in ``ckpt_dir``, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_valid_step_dir(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def _check_pointer_name(name: str) -> None:
    if name not in POINTERS:
        raise ValueError(f"pointer must be one of {POINTERS}, got {name!r}")


def set_pointer(run_dir, name: str, step_dir) -> None:
    """Atomically make ``RUN/ckpt/<name>`` (LATEST or BEST) a one-line pointer to ``step_dir``."""
    _check_pointer_name(name)
    ckpt, step_dir = Path(run_dir) / "ckpt", Path(step_dir)
    if not STEP_RE.match(step_dir.name) or step_dir.parent.resolve() != ckpt.resolve():
        raise ValueError(f"{name} must point to a step-XXXXXXXX folder inside {ckpt}, got {step_dir}")
    _atomic_write_text(ckpt / name, step_dir.name + "\n")


def _pointer_text(ckpt: Path, name: str) -> str | None:
    try:
        return (ckpt / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_pointer(run_dir, name: str) -> Path | None:
    """The step folder ``RUN/ckpt/<name>`` points to, or None when missing, malformed or invalid."""
    _check_pointer_name(name)
    ckpt = Path(run_dir) / "ckpt"
    target = _pointer_text(ckpt, name)
    if not target or not STEP_RE.match(target):
        return None
    return ckpt / target if is_valid_step_dir(ckpt / target) else None


# --------------------------------------------------------------------------- retention


def _stale_temporaries(ckpt: Path) -> list[Path]:
    """``.tmp-*`` step folders and ``.<pointer>.tmp-*`` files left by interrupted saves."""
    return sorted(p for p in ckpt.iterdir() if p.name.startswith(".") and ".tmp-" in p.name)


def _remove(path: Path) -> None:
    """Delete a step folder: rename it out of sight first so that a crash never leaves half of one."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    if not path.name.startswith("."):
        path = path.rename(path.with_name(f".tmp-deleting-{_token()}"))
    shutil.rmtree(path, ignore_errors=True)


def prune(run_dir, keep_last: int = 3) -> list[Path]:
    """Keep the newest ``keep_last`` valid steps plus the BEST/LATEST targets; delete other valid
    steps and stale temporaries. Call it from the run's only writer, after a save has finished (any
    ``.tmp-*`` is then a leftover of a crash). Folders that are not valid steps are left alone.
    Returns what was removed."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    ckpt = Path(run_dir) / "ckpt"
    if not ckpt.is_dir():
        return []
    steps = valid_step_dirs(ckpt)
    keep = {p.name for p in steps[max(0, len(steps) - keep_last):]} if keep_last else set()
    keep |= {_pointer_text(ckpt, name) for name in POINTERS}
    doomed = [p for p in steps if p.name not in keep] + _stale_temporaries(ckpt)
    for path in doomed:
        _remove(path)
    return doomed


# --------------------------------------------------------------------------- resolving a --run value


def _describe_entry(ckpt: Path, entry: Path) -> str:
    if entry.name in POINTERS:
        return f"{entry.name} → {_pointer_text(ckpt, entry.name) or '?'} (missing or incomplete)"
    if entry.name.startswith(".tmp-"):
        return f"{entry.name} (unfinished save)"
    if STEP_RE.match(entry.name):
        return f"{entry.name} (no valid index: half-written or damaged)"
    return entry.name


def _what_is_there(run: Path) -> str:
    """One phrase naming what a run folder without a valid checkpoint holds."""
    ckpt = run / "ckpt"
    if not ckpt.is_dir():
        names = sorted(p.name for p in run.iterdir())[:8]
        return f"{run} holds {', '.join(names)} and no ckpt/ folder" if names else f"{run} is empty"
    entries = sorted(ckpt.iterdir())
    if not entries:
        return f"{ckpt} is empty"
    return f"{ckpt} holds " + ", ".join(_describe_entry(ckpt, e) for e in entries[:8])


def _no_checkpoint(run: Path) -> InputError:
    return InputError(f"no checkpoint in {run}", run / "ckpt",
                      hint=f"{_what_is_there(run)}; create one with `medgen train --resume --run-dir {run}`")


def _parse_which(which) -> str | int:
    """``best`` | ``latest`` | a step number (from ``N``, ``"N"`` or ``"step-N"``)."""
    if isinstance(which, int) and not isinstance(which, bool):
        return which
    text = str(which).strip().lower()
    if text in ("best", "latest"):
        return text
    number = text.removeprefix("step-")
    if number.isdigit():
        return int(number)
    raise UsageError(f"unknown checkpoint choice '{which}', expected best, latest or step-N", "--which",
                     hint=did_you_mean(text, ["best", "latest"]) or "e.g. --which step-1000")


def _exact_step(run: Path, step: int) -> Path:
    folder = run / "ckpt" / step_dir_name(step)
    if is_valid_step_dir(folder):
        return folder
    have = [p.name for p in valid_step_dirs(run / "ckpt")]
    if not have:
        raise _no_checkpoint(run)
    raise InputError(f"no valid checkpoint {folder.name} in {run}", folder,
                     hint=f"valid steps: {', '.join(have[-8:])}")


def _from_pointers(run: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        target = read_pointer(run, name)
        if target is not None:
            return target
        text = _pointer_text(run / "ckpt", name)
        if text is not None:
            log.warning("checkpoint pointer %s → %r is broken; falling back", run / "ckpt" / name, text)
    return None


def _resolve_in_run(run: Path, which) -> Path:
    choice = _parse_which(which)
    if isinstance(choice, int):
        return _exact_step(run, choice)
    names = ("BEST", "LATEST") if choice == "best" else ("LATEST",)
    found = _from_pointers(run, names)
    if found is not None:
        return found
    steps = valid_step_dirs(run / "ckpt")
    if not steps:
        raise _no_checkpoint(run)
    return steps[-1]


def _explicit_folder(path: Path) -> Path:
    if path.name.startswith(".tmp-"):
        raise InputError(f"{path.name} is an unfinished save, not a checkpoint", path,
                         hint=f"pass the run folder {path.parent.parent} or one of its step folders")
    if _is_complete(path):
        return path
    raise InputError(f"incomplete checkpoint folder {path}: its model index is missing, unreadable or "
                     "names a missing shard", path, hint="pass the run folder, or another step folder")


def resolve_step_dir(path, which="best") -> Path:
    """Turn a ``--run`` value into a step folder, or a single ``.safetensors`` file (returned as is).

    ``path`` may be a run folder (``which``: ``best`` = BEST, else LATEST, else the newest valid
    step; ``latest`` = LATEST, else the newest valid step; ``step-N`` or N = that step), its
    ``ckpt/`` folder, a step folder or its index file (``which`` is then ignored), or a file.
    """
    p = Path(path)
    if p.is_file() and p.name.endswith(INDEX_SUFFIX):
        return _explicit_folder(p.parent)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise InputError(f"not a checkpoint: {p}", p,
                             hint="pass a run folder, a step folder or a .safetensors file")
        return p
    if not p.is_dir():
        raise InputError(f"no such checkpoint: {p}", p, hint="pass a run folder (runs/NAME), a step "
                         "folder (runs/NAME/ckpt/step-XXXXXXXX) or a .safetensors file")
    if (p / f"model{INDEX_SUFFIX}").exists() or STEP_RE.match(p.name) or p.name.startswith(".tmp-"):
        return _explicit_folder(p)
    run = p.parent if p.name == "ckpt" and not (p / "ckpt").is_dir() else p
    return _resolve_in_run(run, which)


# --------------------------------------------------------------------------- loading


def _verify_shard(path: Path, expected: dict) -> None:
    """Size, then sha256, against the index; InputError naming the shard on any difference."""
    hint = "this file was damaged; load another step (--which latest or step-N) or re-save it"
    if not path.is_file():
        raise InputError(f"missing shard {path.name} listed in the index", path, hint=hint)
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise InputError(f"checksum mismatch in {path.name}: {size} bytes on disk, the index records "
                         f"{expected['bytes']}; the file was altered or truncated", path, hint=hint)
    digest = _sha256(path)
    if digest != expected["sha256"]:
        raise InputError(f"checksum mismatch in {path.name}: sha256 {digest[:16]}…, the index records "
                         f"{expected['sha256'][:16]}…; the file was altered or truncated", path, hint=hint)


def available_groups(path) -> tuple[str, ...]:
    """Groups stored in a step folder (from its index files), or the one group of a single file."""
    p = Path(path)
    if p.is_file():
        return (_file_header(p).get("group", "model"),)
    return tuple(sorted(f.name[: -len(INDEX_SUFFIX)] for f in p.glob(f"*{INDEX_SUFFIX}")))


def _group_index(step_dir: Path, group: str) -> dict:
    index = _read_index(step_dir, group)
    if index is not None:
        return index
    have = available_groups(step_dir)
    if group in have:
        raise InputError(f"unreadable index {group}{INDEX_SUFFIX}", step_dir / f"{group}{INDEX_SUFFIX}",
                         hint="load another step (--which step-N)")
    raise InputError(f"no '{group}' weights in {step_dir}", step_dir,
                     hint=f"available: {', '.join(have) or 'nothing'}")


def _load_shard(path: Path, names: list[str], device) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path), device=str(device))
    if set(tensors) != set(names):
        raise InputError(f"index and shard {path.name} disagree: the index lists {len(names)} tensors, "
                         f"the shard holds {len(tensors)}", path, hint="load another step (--which step-N)")
    return tensors


def load_group(step_dir, group: str, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of ``group`` in a step folder, every shard verified first; in index order.

    For a single ``.safetensors`` file, its tensors when ``group`` is the file's group."""
    p = Path(step_dir)
    if p.is_file():
        return _load_bare_group(p, group, device)
    index = _group_index(p, group)
    wmap, shards = index["weight_map"], index["metadata"]["shards"]
    for fname, expected in shards.items():
        _verify_shard(p / fname, expected)
    loaded: dict[str, torch.Tensor] = {}
    for fname in shards:
        loaded.update(_load_shard(p / fname, [n for n, f in wmap.items() if f == fname], device))
    return {name: loaded[name] for name in wmap}


def _file_header(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a single file (InputError when it is not safetensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise InputError(f"unreadable safetensors file {path.name}: {exc}", path,
                         hint="pass a run folder, a step folder or an intact .safetensors file") from exc


def _load_bare_group(path: Path, group: str, device) -> dict[str, torch.Tensor]:
    header = _file_header(path)
    have = header.get("group", "model")
    if group != have:
        raise InputError(f"{path.name} holds '{have}' weights, not '{group}'", path,
                         hint="pass the step folder to reach other groups")
    total = int(header.get("shards_total", "1"))
    if total > 1:
        raise InputError(f"{path.name} is one of {total} shards of the '{have}' weights", path,
                         hint=f"pass its step folder {path.parent} instead")
    return load_file(str(path), device=str(device))


def _parse_config(text, where) -> dict:
    if text is None:
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"checkpoint config is not valid JSON: {exc}", where) from exc


def _load_bare(path: Path, device) -> Checkpoint:
    header = _file_header(path)
    group = header.get("group", "model")
    step = header.get("step")
    return Checkpoint(step_dir=path, step=int(step) if step else None, epoch=None,
                      config=_parse_config(header.get("config"), path),
                      model_state=_load_bare_group(path, group, device),
                      weights="ema" if group == "ema" else "raw", groups=(group,))


def load_checkpoint(path, which="best", weights: str = "ema", device="cpu") -> Checkpoint:
    """Resolve ``path`` (see :func:`resolve_step_dir`) and load its model weights, verified.

    ``weights="ema"`` takes the EMA group when the step has one, else the raw weights; the
    returned ``.weights`` says which. A single ``.safetensors`` file gives just its own group.
    """
    if weights not in ("ema", "raw"):
        raise UsageError(f"unknown weights '{weights}', expected ema or raw", "--weights",
                         hint=did_you_mean(weights, ["ema", "raw"]) or "use --weights ema or raw")
    target = resolve_step_dir(path, which)
    if target.is_file():
        return _load_bare(target, device)
    groups = available_groups(target)
    use = "ema" if weights == "ema" and "ema" in groups else "model"
    meta = _group_index(target, "model")["metadata"]
    state = _read_trainer_state(target)
    return Checkpoint(step_dir=target, step=int(meta["step"]), epoch=state.get("epoch", meta.get("epoch")),
                      config=_parse_config(meta.get("config"), target / f"model{INDEX_SUFFIX}"),
                      model_state=load_group(target, use, device),
                      weights="ema" if use == "ema" else "raw", trainer_state=state, groups=groups)


def _param_counts(state_dict: dict) -> list[int]:
    return [len(g["params"]) for g in state_dict["param_groups"]]


def load_optimizer_state(step_dir, template_optimizer_state_dict: dict, device="cpu") -> dict:
    """The optimizer state_dict saved in a step folder, verified and checked against the template
    (the resuming optimizer's ``state_dict()``): same parameter groups with the same sizes."""
    p = Path(step_dir)
    if p.is_file() or "optimizer" not in available_groups(p):
        raise InputError(f"no optimizer state in {p}", p, hint="resume needs a step folder written by "
                         "`medgen train`; start a new run instead of --resume")
    skeleton = _group_index(p, "optimizer")["metadata"].get("optimizer")
    if skeleton is None:
        raise InputError(f"optimizer index in {p} lacks its 'optimizer' skeleton", p / f"optimizer{INDEX_SUFFIX}")
    state = unflatten_optimizer(load_group(p, "optimizer", device), skeleton)
    saved, expected = _param_counts(state), _param_counts(template_optimizer_state_dict)
    if saved != expected:
        raise InputError(f"optimizer state has parameter groups of sizes {saved}, the optimizer being "
                         f"resumed has {expected}", p, hint="the model changed since this checkpoint; "
                         "resume with the run's own config or start a new run")
    return state
