"""Rectified flow in MONAI's time direction (docs/ARCHITECTURE.md, SYSTEM.md §2).

Normalised time ``t ∈ [0, 1]``: t = 0 is clean data, t = 1 is noise.

    x_t = (1 − t)·x₀ + t·ε        v = x₀ − ε        x̂₀ = x_t + t·v̂        dx/dt = −v

Every method takes ``t`` as a float tensor ``(B,)`` of normalised times and broadcasts it over
``x`` (B, C, *spatial). The network sees ``model_time(t) = t·T``.

Discrete time (``continuous=False``): t takes the values k/T, k ∈ {1, …, T}, drawn as
k = ceil(t·T) from the (shifted) continuous t, so every k is equally likely under uniform t and the
set is exactly the one the sampler visits (T·(1 − i/N) for i < N, which includes T and excludes 0).
MONAI floors to {0, …, T−1} and applies the shift after rounding (giving non-integer "discrete" times);
we shift first so discrete times stay on the grid. The difference is one step in T.

Sampling grid: ``time_grid(N)`` is linspace(1, 0, N+1) in float64 with the shift applied. MONAI builds
the same points but casts them to float16 before use; that cast is a reference quirk and is not
reproduced (it moves times by up to ~5e-4·T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medgen_cli.errors import UsageError

from .common import check_choice, mse_loss, per_sample

U_EPS = 1e-6  # u is clamped to [U_EPS, 1 − U_EPS] so Φ⁻¹(u) stays finite
T_MIN = 1e-4  # smallest t used to turn an x₀ prediction into a velocity

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift t' = r·t / (1 + (r − 1)·t); r > 1 moves time towards noise, r = 1 is identity."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow:
    """Rectified-flow noise process: paths, targets, losses, time grids and the sampling ODE."""

    kind = "rflow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        continuous: bool = True,
        t_sampling: str = "logit-normal",
        shift: float = 1.0,
        prediction: str = "velocity",
    ):
        self.T = int(num_train_timesteps)
        self.continuous = bool(continuous)
        self.t_sampling = check_choice(t_sampling, ("logit-normal", "uniform"), "diffusion.t_sampling")
        self.shift = float(shift)
        self.prediction = check_choice(prediction, ("velocity", "sample"), "diffusion.prediction")

    # ---- training -------------------------------------------------------------------------
    def times_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Per-sample uniforms u (B,) → normalised training times t (B,) in (0, 1]."""
        u = u.float().clamp(U_EPS, 1.0 - U_EPS)  # (B,)
        if self.t_sampling == "logit-normal":
            t = torch.sigmoid(2.0**0.5 * torch.erfinv(2.0 * u - 1.0))  # sigmoid(Φ⁻¹(u)), (B,)
        else:
            t = u
        t = shift_time(t, self.shift)
        if not self.continuous:
            t = torch.ceil(t * self.T).clamp(1, self.T) / self.T  # k/T, k ∈ {1..T}
        return t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Network input time t·T (B,) float32; rounded to integers when discrete."""
        mt = t.float() * self.T
        return mt if self.continuous else torch.round(mt)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x₀ + t·ε, in x₀'s dtype."""
        tb = per_sample(t.float(), x0)  # (B, 1, ..., 1)
        return ((1.0 - tb) * x0 + tb * noise).to(x0.dtype)  # (B, C, *spatial)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns: v = x₀ − ε (velocity) or x₀ (sample)."""
        del t
        return x0 - noise if self.prediction == "velocity" else x0

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar MSE in fp32 (optional per-sample ``weight`` (B,))."""
        return mse_loss(pred, target, weight)

    # ---- predictions ----------------------------------------------------------------------
    def velocity(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v̂ from the network output; an x₀ prediction gives v̂ = (x̂₀ − x_t)/max(t, T_MIN)."""
        if self.prediction == "velocity":
            return pred
        tb = per_sample(t.float().clamp_min(T_MIN), x_t)  # (B, 1, ..., 1)
        return ((pred.float() - x_t.float()) / tb).to(x_t.dtype)

    def x0_from(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean estimate x̂₀ = x_t + t·v̂ (or the x₀ prediction itself)."""
        if self.prediction == "sample":
            return pred
        tb = per_sample(t.float(), x_t)  # (B, 1, ..., 1)
        return (x_t + tb * pred).to(x_t.dtype)

    def drift(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt of the sampling ODE: −v̂."""
        return -self.velocity(pred, x_t, t)

    # ---- sampling -------------------------------------------------------------------------
    def time_grid(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """steps+1 decreasing normalised times from 1 to 0 (float64, CPU).

        ``shift`` None applies the training schedule's resolution shift; 1.0 gives the uniform grid;
        any other r > 0 applies t' = r·t / (1 + (r − 1)·t)."""
        if int(steps) < 1:
            raise UsageError(f"need at least 1 sampling step, got {steps}", "--steps", "use --steps 1 or more")
        r = self.shift if shift is None else float(shift)
        if r <= 0:
            raise UsageError(f"time-grid shift must be > 0, got {r}", "--shift", "use e.g. --shift 2")
        return shift_time(torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64), r)

    def renoise(self, x: torch.Tensor, t_cur: float, t_max: float, noise: torch.Tensor) -> torch.Tensor:
        """Move a state at time ``t_cur`` forward to ``t_max`` ≥ t_cur along the noising path (Restart).

        With x_t = (1 − t)x₀ + tε: x ← α·x + σ·z, α = (1 − t_max)/(1 − t_cur), σ² = t_max² − α²·t_cur²,
        so the x₀ coefficient becomes 1 − t_max and the noise variance t_max² (SYSTEM.md §9)."""
        if not 0.0 <= t_cur <= t_max < 1.0:
            raise UsageError(f"restart needs 0 <= t_min <= t_max < 1, got {t_cur}, {t_max}", "--restart",
                             "e.g. --restart 2,5,0.1,0.3")
        alpha = (1.0 - t_max) / (1.0 - t_cur)
        sigma = max(t_max**2 - alpha**2 * t_cur**2, 0.0) ** 0.5
        return (alpha * x.float() + sigma * noise.float()).to(x.dtype)

    def ode(self, net: Net) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """f(x, t) = dx/dt for a solver; ``t`` a scalar normalised time, ``net(x, model_time)``."""

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tb = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)  # (B,)
            return self.drift(net(x, self.model_time(tb)), x, tb)

        return f

    def sample(self, net: Net, x_T: torch.Tensor, steps: int, solver, callback=None) -> torch.Tensor:
        """Integrate from noise ``x_T`` (t = 1) to data (t = 0) with ``solver`` over ``time_grid(steps)``."""
        return solver(self.ode(net), x_T, self.time_grid(steps), callback=callback)
