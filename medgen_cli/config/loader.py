"""Load a preset: TOML files with `extends`, then `--set` overrides, then named flags. No torch.

`load(ref, sets, flags)` returns the validated `Preset` and its provenance (every file read, with
its sha256). Every validation error is reported at once, with its dotted path and a did-you-mean,
as a `ConfigError` (exit 3).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError, UsageError, did_you_mean
from .schema import Preset


@dataclass
class Loaded:
    preset: Preset
    files: list[dict] = field(default_factory=list)  # [{"path", "sha256"}], base first
    sets: list[str] = field(default_factory=list)


def presets_dir() -> Path:
    """The shipped presets: packaged as `medgen_cli.presets`, or `presets/` beside the source tree."""
    try:
        from importlib.resources import files

        d = Path(str(files("medgen_cli.presets")))
        if d.is_dir():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "presets"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml") if p.stem != "INDEX")


def _find(ref: str, base_dir: Path | None) -> Path:
    """A preset reference is a shipped name, or a path (relative to the extending file)."""
    if ref.endswith(".toml") or "/" in ref:
        p = Path(ref)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise ConfigError(f"preset file not found: {ref}", str(p), "check the path")
        return p
    p = presets_dir() / f"{ref}.toml"
    if not p.is_file():
        hint = did_you_mean(ref, shipped_names()) or "list presets with `medgen presets`"
        raise ConfigError(f"unknown preset '{ref}'", "--preset", hint)
    return p


def _read(path: Path) -> tuple[dict, str]:
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"preset is not valid TOML: {e}", str(path), "fix the TOML syntax") from None
    return data, hashlib.sha256(raw).hexdigest()


def merge(base: dict, over: dict) -> dict:
    """Deep merge: tables merge key by key, anything else replaces. A table that names a different
    `kind` than the base's replaces it whole (switching the model family or the strategy drops the old
    one's keys: `--set model.kind=dit` on a UNet preset, or a DiT preset extending a UNet one)."""
    out = dict(base)
    for k, v in over.items():
        same_kind = isinstance(out.get(k), dict) and v.get("kind", out[k].get("kind")) == out[k].get("kind") \
            if isinstance(v, dict) else False
        out[k] = merge(out[k], v) if same_kind else v
    return out


def _resolve(ref: str, base_dir: Path | None, seen: tuple[Path, ...], files: list[dict]) -> dict:
    path = _find(ref, base_dir).resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise ConfigError(f"preset extends itself: {chain}", str(path), "remove the cycle in `extends`")
    data, sha = _read(path)
    parent = data.pop("extends", None)
    base = _resolve(parent, path.parent, (*seen, path), files) if parent else {}
    files.append({"path": str(path), "sha256": sha})
    return merge(base, data)


def parse_set(item: str) -> dict:
    """`section.key=value` with value a TOML literal (bare words become strings)."""
    if "=" not in item:
        raise UsageError(f"--set expects section.key=value, got '{item}'", "--set",
                         "e.g. --set train.lr=5e-5 or --set model.channels=[16,32,64]")
    key, value = item.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    out: Any = parsed
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load(ref: str | None, sets: list[str] = (), flags: dict | None = None,
         base: dict | None = None) -> Loaded:
    """Resolve `ref` (shipped name or .toml path) or start from `base` (a saved config)."""
    files: list[dict] = []
    data = _resolve(ref, None, (), files) if ref else dict(base or {})
    for item in sets:
        data = merge(data, parse_set(item))
    for dotted, value in (flags or {}).items():
        if value is not None:
            data = merge(data, parse_set_value(dotted, value))
    if ref and not (ref.endswith(".toml") or "/" in ref):
        data.setdefault("name", ref)
    elif ref:
        data.setdefault("name", Path(ref).stem)
    return Loaded(validate(data, where=ref or "config"), files, list(sets))


def parse_set_value(dotted: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def validate(data: dict, where: str = "preset") -> Preset:
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, data) for err in e.errors()]
        raise ConfigError(f"invalid preset: {len(lines)} problem(s)", where,
                          "fix the keys above in the preset or the --set option", details=lines) from None


def _describe(err: dict, data: dict) -> str:
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("unet", "dit", "rflow", "ddpm"))]
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(loc[-1], _fields_at(loc[:-1], data))
        return f"{path}: unknown key" + (f"; {hint}" if hint else "")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}{shown}"


def _fields_at(loc: list[str], data: dict) -> list[str]:
    """Valid field names of the schema model at `loc` (following `kind` discriminators)."""
    model: type[BaseModel] = Preset
    node: Any = data
    for part in loc:
        node = node.get(part, {}) if isinstance(node, dict) else {}
        ann = model.model_fields.get(part)
        if ann is None:
            return []
        model = _model_of(ann.annotation, node)
        if model is None:
            return []
    return list(model.model_fields)


def _model_of(annotation, node) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        m = _model_of(arg, node)
        if m is not None:
            kind = m.model_fields.get("kind")
            if kind is None or not isinstance(node, dict) or node.get("kind") in (None, kind.default):
                return m
    return None


def dump(preset: Preset) -> dict:
    return preset.model_dump(mode="json")
