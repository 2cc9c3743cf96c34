"""Helpers shared by the noise processes: broadcasting, the fp32 loss, option checks."""

from __future__ import annotations

import torch

from medgen_cli.errors import ConfigError, did_you_mean


def per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor ``(B,)`` to broadcast against ``x`` (B, C, *spatial)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32; ``weight`` (B,) scales each sample's mean before averaging."""
    err = (pred.float() - target.float()).square().flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        err = err * weight.to(err)
    return err.mean()


def check_choice(value: str, choices: tuple[str, ...], where: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError with did-you-mean."""
    if value not in choices:
        hint = did_you_mean(value, choices) or f"choose one of: {', '.join(choices)}"
        raise ConfigError(f"unknown value '{value}'", where, hint)
    return value
