"""Presets: schema (pydantic) and loading (TOML, extends, --set). Imports no torch."""

from .loader import Loaded, dump, load, presets_dir, shipped_names, validate
from .schema import Preset

__all__ = ["Loaded", "Preset", "dump", "load", "presets_dir", "shipped_names", "validate"]
