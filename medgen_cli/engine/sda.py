"""SDA, shifted data augmentation (Nakamura 2025; SYSTEM.md §5).

Per batch, with probability ``prob`` (one draw keyed by (seed, step)), one transform T is picked
uniformly from rot90 x {1, 2, 3}, hflip, vflip (3D: rotations about D, and also the depth flip). The
augmented branch takes T(clean image), T(noise) and T(condition maps), noises them at the shifted
time t + δ and adds ``weight`` x its MSE to the loss.

The intended shift is in normalised time (t ∈ [0, 1], 1 = pure noise): t' = min(t + δ, 1), put back on
the strategy's time grid. Two reference quirks are reproduced on request (SYSTEM.md §12 item 7):
``compat.sda_shift_clamp_bug`` — the reference added δ to t in [0, T] and clamped to [0, 1], so every
augmented sample trained at t ≈ 1/T (almost clean); ``compat.sda_untransformed_condition`` — the
condition was not transformed, so a rotated image was paired with the unrotated mask.
"""

from __future__ import annotations

import torch

from ..runtime import keyed_generator
from . import tricks
from .scoreaug import apply_spatial

STREAM_SDA = 0x534441  # keyed draws: (seed, STREAM_SDA, step)
CHOICES_2D = (("rot", 1), ("rot", 2), ("rot", 3), ("hflip", 0), ("vflip", 0))
CHOICES_3D = CHOICES_2D + (("dflip", 0),)


def draw(seed: int, step: int, prob: float, dims: int) -> tuple[str, int] | None:
    """The batch's transform, or None (no augmented branch this step)."""
    g = keyed_generator(int(seed), STREAM_SDA, int(step))
    if float(torch.rand((), generator=g)) >= prob:
        return None
    choices = CHOICES_2D if dims == 2 else CHOICES_3D
    return choices[int(torch.randint(len(choices), (), generator=g))]


def shifted_times(strategy, t: torch.Tensor, delta: float, clamp_bug: bool = False) -> torch.Tensor:
    """t' on the strategy's grid: min(t + δ, 1) (intended) or clamp(t·T + δ, 0, 1) / T (the reference)."""
    T = strategy.T
    raw = (t * T + delta).clamp(0, 1) / T if clamp_bug else (t + delta).clamp(max=1.0)
    if getattr(strategy, "kind", "rflow") == "ddpm" or getattr(strategy, "alpha_bar", None) is not None:
        return torch.floor(raw * T).clamp(0, T - 1) / T
    if not strategy.continuous:  # k/T grid; the tolerance keeps k/T + j/T on k + j despite rounding
        return torch.ceil(raw * T - 1e-4).clamp(1, T) / T
    return tricks.snap_rflow(strategy, raw)


def branch(net, strategy, image, cond, t, noise, op, delta: float, clamp_bug: bool, untransformed_cond: bool):
    """(prediction, target) of the augmented branch for transform ``op``."""
    x0, nz = apply_spatial(image, *op), apply_spatial(noise, *op)
    c = cond if untransformed_cond else apply_spatial(cond, *op)  # constant vector maps are unchanged
    t2 = shifted_times(strategy, t, delta, clamp_bug)
    x_t = strategy.noisy(x0, nz, t2)
    target = strategy.target(x0, nz, t2)
    pred = net(torch.cat([x_t, c], dim=1), strategy.model_time(t2))
    return pred, target
