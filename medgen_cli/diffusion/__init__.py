"""Noise processes (diffusion strategies): paths, targets, losses, time grids, sampling.

Conventions (full text in docs/ARCHITECTURE.md): every method takes normalised time ``t`` (B,) float;
the network sees ``model_time(t)``. Rectified flow: t = 0 clean, t = 1 noise,
x_t = (1 − t)x₀ + tε, velocity v = x₀ − ε, dx/dt = −v, sampled from t = 1 to 0 by a solver.
DDPM: t = k/T with integer k, x_t = √ᾱ_k x₀ + √(1 − ᾱ_k) ε, sampled with DDIM (η = 0).
A training step is the same for both::

    t = s.times_from_uniform(u)                      # u (B,) from keyed generators
    pred = net(s.noisy(x0, eps, t), s.model_time(t))
    loss = s.loss(pred, s.target(x0, eps, t))

Imports neither ``models`` nor ``solvers``.
"""

from __future__ import annotations

from medgen_cli.errors import ConfigError, did_you_mean

from .ddpm import DDPM
from .rflow import RectifiedFlow, shift_time

STRATEGIES = {"rflow": RectifiedFlow, "ddpm": DDPM}


def build_strategy(kind: str, **kwargs) -> RectifiedFlow | DDPM:
    """The noise process named ``kind`` ("rflow" | "ddpm") built with its keyword options."""
    if kind not in STRATEGIES:
        hint = did_you_mean(kind, STRATEGIES) or f"choose one of: {', '.join(STRATEGIES)}"
        raise ConfigError(f"unknown diffusion kind '{kind}'", "diffusion.kind", hint)
    return STRATEGIES[kind](**kwargs)


__all__ = ["DDPM", "STRATEGIES", "RectifiedFlow", "build_strategy", "shift_time"]
