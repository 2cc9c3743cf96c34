"""Model registry: a kind (string) → a builder; parameter counts without allocating weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medgen_cli.errors import ConfigError, did_you_mean

from .dit import build_dit
from .unet import build_unet

MODELS: dict[str, Callable[..., nn.Module]] = {"unet": build_unet, "dit": build_dit}


def _builder(kind: str) -> Callable[..., nn.Module]:
    if kind not in MODELS:
        hint = did_you_mean(kind, MODELS) or f"choose one of: {', '.join(sorted(MODELS))}"
        raise ConfigError(f"unknown model kind '{kind}'", "model.kind", hint)
    return MODELS[kind]


def build_model(kind: str, **kwargs) -> nn.Module:
    """Build the ``kind`` model on the current default device; invalid knobs → ConfigError."""
    builder = _builder(kind)
    try:
        return builder(**kwargs)
    except ValueError as err:  # MONAI validates its knobs with ValueError
        raise ConfigError(f"invalid {kind} settings: {err}", "model", "check the [model] section") from err


def count_parameters(kind: str, **kwargs) -> int:
    """Number of parameters of ``build_model(kind, **kwargs)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(kind, **kwargs)
    return sum(p.numel() for p in model.parameters())
