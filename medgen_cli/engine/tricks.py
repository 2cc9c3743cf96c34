"""Training tricks of the reference (SYSTEM.md §5), each small and stateless or with saved state.

Randomness here is keyed like the rest of training (the caller passes keyed draws), so resume
and data parallelism are unaffected. State that must survive a resume (spike statistics, the
plateau schedule) is a plain dict saved in trainer_state.json.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def snr(strategy, t: torch.Tensor, unsquared: bool = False) -> torch.Tensor:
    """Signal-to-noise ratio at normalised time t (B,): rflow ((1-t)/t)^2, DDPM abar/(1-abar)."""
    if getattr(strategy, "alpha_bar", None) is not None:
        a = strategy.alpha_bar(t)
        return a / (1 - a).clamp_min(1e-12)
    r = (1 - t) / t.clamp_min(1e-6)
    return r if unsquared else r**2


def min_snr_weight(strategy, t: torch.Tensor, gamma: float, unsquared: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight min(SNR, gamma) / SNR per sample (B,) (Hang et al. 2023)."""
    s = snr(strategy, t, unsquared)
    return torch.minimum(s, torch.full_like(s, gamma)) / s.clamp_min(1e-12)


def augment_noise(noise: torch.Tensor, extra: torch.Tensor, std: float) -> torch.Tensor:
    """noise + std * extra, rescaled so the result keeps unit variance."""
    return (noise + std * extra) / math.sqrt(1 + std**2)


def curriculum_max(epoch: int, epochs: int, start_max: float) -> float:
    """Upper end of the uniform t range at `epoch`: start_max -> 1 linearly over `epochs`."""
    return start_max + (1 - start_max) * min(epoch / epochs, 1.0)


def snap_rflow(strategy, t: torch.Tensor) -> torch.Tensor:
    """Back onto the training grid k/T, k in {1..T}, for discrete-time rectified flow."""
    if strategy.continuous:
        return t.clamp(1e-6, 1.0)
    return torch.ceil(t * strategy.T).clamp(1, strategy.T) / strategy.T


@torch.no_grad()
def add_grad_noise(params, sigma: float, step: int, generator: torch.Generator) -> None:
    """Gradient noise N(0, sigma_t^2), sigma_t = sigma / (1 + step)^0.55 (Neelakantan et al. 2015)."""
    s = sigma / (1 + step) ** 0.55
    for p in params:
        if p.grad is not None:
            z = torch.randn(p.grad.shape, generator=generator, dtype=torch.float32)
            p.grad.add_(z.to(p.grad.device, p.grad.dtype), alpha=s)


class SpikeGuard:
    """Skip optimizer steps whose pre-clip gradient norm is > factor x the running mean.

    The running mean is updated on every step with min(norm, factor x mean), so a spike moves it
    by at most (1 - decay) x factor and a lasting change of scale is still learned — unlike the
    reference's early detector, which froze its mean after a skip and then skipped forever.
    """

    def __init__(self, factor: float, decay: float, warmup: int):
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.state = {"mean": None, "seen": 0, "skipped": 0}

    def skip(self, norm: float) -> bool:
        st = self.state
        mean = st["mean"]
        spike = mean is not None and st["seen"] >= self.warmup and norm > self.factor * mean
        capped = norm if mean is None else min(norm, self.factor * mean)
        st["mean"] = capped if mean is None else self.decay * mean + (1 - self.decay) * capped
        st["seen"] += 1
        st["skipped"] += int(spike)
        return spike


class Plateau:
    """ReduceLROnPlateau on the validation loss: scale x factor after `patience` flat validations."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.state = {"best": None, "bad": 0, "scale": 1.0}

    def observe(self, val_loss: float) -> None:
        st = self.state
        if st["best"] is None or val_loss < st["best"]:
            st["best"], st["bad"] = val_loss, 0
            return
        st["bad"] += 1
        if st["bad"] > self.patience:
            st["scale"], st["bad"] = st["scale"] * self.factor, 0


def middle_block(model: nn.Module) -> nn.Module:
    mid = getattr(model, "middle_block", None)
    if mid is None:
        raise ValueError("feature perturbation needs a network with a middle block (the UNet)")
    return mid


class FeaturePerturbation:
    """A forward hook adding N(0, std^2) to the middle block's output while training.

    The noise comes from a generator the trainer re-keys every step (draws stay reproducible).
    """

    def __init__(self, model: nn.Module, std: float):
        self.std, self.generator = std, torch.Generator()
        self.handle = middle_block(model).register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if not module.training:
            return out
        z = torch.randn(out.shape, generator=self.generator, dtype=torch.float32)
        return out + self.std * z.to(out.device, out.dtype)


@torch.no_grad()
def sam_perturb(model: nn.Module, rho: float, adaptive: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move the weights to the (A)SAM ascent point w + e; returns what to subtract afterwards."""
    params = [p for p in model.parameters() if p.grad is not None]
    scaled = [(p.abs() if adaptive else 1.0) * p.grad for p in params]
    norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2).clamp_min(1e-12)
    moves = []
    for p, s in zip(params, scaled):
        e = (p.abs() if adaptive else 1.0) * s * (rho / norm)
        p.add_(e)
        moves.append((p, e))
    return moves


@torch.no_grad()
def sam_restore(moves) -> None:
    for p, e in moves:
        p.sub_(e)
