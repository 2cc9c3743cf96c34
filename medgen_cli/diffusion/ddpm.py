"""DDPM (Ho et al. 2020) with MONAI's schedules, trained on integer steps and sampled with DDIM (η = 0).

Time convention shared with rectified flow: methods take normalised ``t = k/T`` (B,) float, with
k ∈ {0, …, T−1} the integer step; ``model_time(t) = k`` (float) is what the network sees. A trainer
therefore runs the same code for both strategies:
``t = s.times_from_uniform(u); y = net(s.noisy(x0, ε, t), s.model_time(t)); s.loss(y, s.target(x0, ε, t))``.

    x_t = √ᾱ_k·x₀ + √(1 − ᾱ_k)·ε,    target ε (prediction="epsilon") or x₀ ("sample")

Schedules as MONAI's ``DDPMScheduler`` defines them (computed here in float64):
``linear_beta`` β linear from 1e-4 to 2e-2; ``cosine`` (Nichol & Dhariwal 2021, s = 0.008):
ᾱ(i) = cos²((i/T + s)/(1 + s)·π/2) / ᾱ(0), β clipped to ≤ 0.999, ᾱ re-accumulated from the clipped β.

DDIM (Song et al. 2021, eq. 12 with σ = 0) visits the grid k_0 > … > k_{N−1} and steps from k_i to
k_{i+1}, the last step to ᾱ = 1. ``ddim_spacing``: "linspace" k_i = round(linspace(T−1, 0, N))
(MONAI since PR #8623, Nov 2025, as installed here; the default) or "leading"
k_i = (N−1−i)·(T//N) (older MONAI and GenerativeModels, so the reference's DDPM runs may have used
it; starts at T − T//N, never at T−1).
MONAI steps to k_i − T//N instead of k_{i+1}; with "linspace" and N not dividing T that is off the
grid by up to one step (a quirk not reproduced). With ``clip_sample`` x̂₀ is clamped to [−1, 1] and
ε̂ is left as predicted (as MONAI does).

Conditioning caveat: the cosine schedule clips β_{T−1} to 0.999, so ᾱ_{T−1} ≈ 1e-3·ᾱ_{T−2}
(2.4e-9 at T = 1000). An ε-prediction's x̂₀ at k = T−1 divides by √ᾱ ≈ 5e-5, so the first
"linspace" step multiplies the network's ε error at k = T−1 by √(ᾱ_{k_1}/ᾱ_{T−1}) (≈ 630 for N = 50).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from medgen_cli.errors import UsageError

from .common import check_choice, mse_loss, per_sample

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def alphas_cumprod(schedule: str, T: int) -> torch.Tensor:
    """ᾱ_k for k = 0..T−1 (float64), as MONAI's DDPMScheduler defines the schedule."""
    if schedule == "linear_beta":
        betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    else:  # cosine
        s = 8e-3
        i = torch.linspace(0, T, T + 1, dtype=torch.float64)
        abar = torch.cos((i / T + s) / (1 + s) * math.pi * 0.5) ** 2
        abar = abar / abar[0]
        betas = (1.0 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)
    return torch.cumprod(1.0 - betas, dim=0)


class DDPM:
    """Discrete-time diffusion with ε or x₀ prediction; see the module docstring."""

    kind = "ddpm"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "cosine",
        prediction: str = "epsilon",
        clip_sample: bool = False,
        ddim_spacing: str = "linspace",
    ):
        self.T = int(num_train_timesteps)
        self.schedule = check_choice(schedule, ("cosine", "linear_beta"), "diffusion.schedule")
        self.prediction = check_choice(prediction, ("epsilon", "sample"), "diffusion.prediction")
        self.clip_sample = bool(clip_sample)
        self.ddim_spacing = check_choice(ddim_spacing, ("linspace", "leading"), "diffusion.ddim_spacing")
        self.alphas_cumprod = alphas_cumprod(self.schedule, self.T)  # (T,) float64, CPU
        self._tables: dict[torch.device, torch.Tensor] = {}  # float32 copies per device

    # ---- time -----------------------------------------------------------------------------
    def times_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Per-sample uniforms u (B,) → t = k/T with k = floor(u·T) ∈ {0..T−1} (B,) float32."""
        k = torch.floor(u.float() * self.T).clamp(0, self.T - 1)
        return k / self.T

    def steps_of(self, t: torch.Tensor) -> torch.Tensor:
        """Integer steps k (B,) int64 for normalised times t."""
        return torch.round(t.float() * self.T).long().clamp(0, self.T - 1)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Network input time k (B,) float32."""
        return self.steps_of(t).float()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at times t (B,) float32 on t's device."""
        if t.device not in self._tables:
            self._tables[t.device] = self.alphas_cumprod.to(device=t.device, dtype=torch.float32)
        return self._tables[t.device][self.steps_of(t)]  # (B,)

    # ---- training -------------------------------------------------------------------------
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ·x₀ + √(1 − ᾱ)·ε, in x₀'s dtype."""
        a = per_sample(self.alpha_bar(t), x0)  # (B, 1, ..., 1)
        return (a.sqrt() * x0 + (1.0 - a).sqrt() * noise).to(x0.dtype)  # (B, C, *spatial)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε (prediction="epsilon") or x₀ ("sample")."""
        del t
        return noise if self.prediction == "epsilon" else x0

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar MSE in fp32 (optional per-sample ``weight`` (B,))."""
        return mse_loss(pred, target, weight)

    # ---- predictions ----------------------------------------------------------------------
    def _eps_x0(self, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor):
        """(ε̂, x̂₀) from the network output; ``a`` = ᾱ broadcast to x_t. x̂₀ clipped if asked."""
        if self.prediction == "epsilon":
            eps, x0 = pred, (x_t - (1.0 - a).sqrt() * pred) / a.sqrt()
        else:
            eps, x0 = (x_t - a.sqrt() * pred) / (1.0 - a).sqrt(), pred
        return eps, (x0.clamp(-1.0, 1.0) if self.clip_sample else x0)

    def x0_from(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean estimate x̂₀ (clipped to [−1, 1] with ``clip_sample``)."""
        a = per_sample(self.alpha_bar(t), x_t)  # (B, 1, ..., 1)
        return self._eps_x0(x_t, pred, a)[1].to(x_t.dtype)

    # ---- sampling -------------------------------------------------------------------------
    def ddim_steps(self, steps: int) -> list[int]:
        """Decreasing integer steps visited by DDIM (see ``ddim_spacing`` in the module docstring)."""
        n = int(steps)
        if not 1 <= n <= self.T:
            raise UsageError(f"DDIM needs 1..{self.T} steps, got {steps}", "--steps", f"use 1 to {self.T}")
        if self.ddim_spacing == "leading":
            return [i * (self.T // n) for i in reversed(range(n))]
        return torch.linspace(self.T - 1, 0, n, dtype=torch.float64).round().long().tolist()

    def ddim_sample(self, net: Net, x_T: torch.Tensor, steps: int, callback=None) -> torch.Tensor:
        """Deterministic DDIM from ``x_T`` ~ N(0, I); ``net(x, model_time (B,)) -> prediction``.

        ``callback(i, t_next, x)`` runs after step i with the new normalised time (0 at the end).
        """
        ks = self.ddim_steps(steps)
        x = x_T
        for i, k in enumerate(ks):
            k_next = ks[i + 1] if i + 1 < len(ks) else None
            x = self._ddim_step(net, x, k, k_next)
            if callback is not None:
                callback(i, (k_next / self.T) if k_next is not None else 0.0, x)
        return x

    def _ddim_step(self, net: Net, x: torch.Tensor, k: int, k_next: int | None) -> torch.Tensor:
        """x_{k_next} = √ᾱ'·x̂₀ + √(1 − ᾱ')·ε̂ with ᾱ' = ᾱ_{k_next} (1 after the last step)."""
        mt = torch.full((x.shape[0],), float(k), device=x.device)  # (B,)
        work = torch.promote_types(x.dtype, torch.float32)  # at least fp32; fp64 stays fp64
        pred = net(x, mt).to(work)  # (B, C, *spatial)
        a = torch.full((), float(self.alphas_cumprod[k]), device=x.device, dtype=work)  # a fill: no host sync
        a_next = float(self.alphas_cumprod[k_next]) if k_next is not None else 1.0
        eps, x0 = self._eps_x0(x.to(work), pred, a)
        return (a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps).to(x.dtype)

    def sample(self, net: Net, x_T: torch.Tensor, steps: int, solver=None, callback=None) -> torch.Tensor:
        """Same call as ``RectifiedFlow.sample``; DDPM always uses DDIM, so ``solver`` must be None."""
        if solver is not None:
            raise UsageError("DDPM samples with DDIM only", "--solver", "leave --solver unset for ddpm")
        return self.ddim_sample(net, x_T, steps, callback=callback)
