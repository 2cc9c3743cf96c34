"""Fixed-step explicit integrators of dx/dt = f(x, t) along a decreasing time grid.

All share ``solve(f, x, ts, *, callback=None) -> x``: ``ts`` (N+1,) normalised times from 1 to 0,
step k goes from ts[k] to ts[k+1] with h = ts[k+1] − ts[k] < 0. Times are taken from ``ts`` (keep it
float64 on the CPU) and passed to ``f`` as 0-d tensors; x keeps its own dtype (bf16 allowed).
``callback(k, t_next, x)`` runs after each step with the new state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[Field, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _integrate(step: Step, f: Field, x: torch.Tensor, ts: torch.Tensor, callback=None) -> torch.Tensor:
    """Apply ``step(f, x, t, t_next)`` along ``ts``."""
    for k in range(len(ts) - 1):
        x = step(f, x, ts[k], ts[k + 1])
        if callback is not None:
            callback(k, ts[k + 1], x)
    return x


def _euler_step(f: Field, x, t, t_next):
    h = float(t_next - t)
    return x + h * f(x, t).to(x.dtype)


def _midpoint_step(f: Field, x, t, t_next):
    h = float(t_next - t)
    x_mid = x + (h / 2) * f(x, t).to(x.dtype)
    return x + h * f(x_mid, t + (t_next - t) / 2).to(x.dtype)


def _heun2_step(f: Field, x, t, t_next):
    h = float(t_next - t)
    d1 = f(x, t).to(x.dtype)
    x_pred = x + h * d1
    if float(t_next) == 0.0:  # Karras et al. 2022, Alg. 1: no correction on the step to t = 0
        return x_pred
    d2 = f(x_pred, t_next).to(x.dtype)
    return x + (h / 2) * (d1 + d2)


def _heun3_step(f: Field, x, t, t_next):
    h = float(t_next - t)
    dt = t_next - t
    k1 = f(x, t).to(x.dtype)
    k2 = f(x + (h / 3) * k1, t + dt / 3).to(x.dtype)
    k3 = f(x + (2 * h / 3) * k2, t + 2 * dt / 3).to(x.dtype)
    return x + (h / 4) * (k1 + 3 * k3)


def _rk4_step(f: Field, x, t, t_next):
    h = float(t_next - t)
    t_mid = t + (t_next - t) / 2
    k1 = f(x, t).to(x.dtype)
    k2 = f(x + (h / 2) * k1, t_mid).to(x.dtype)
    k3 = f(x + (h / 2) * k2, t_mid).to(x.dtype)
    k4 = f(x + h * k3, t_next).to(x.dtype)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def euler(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Explicit Euler, order 1: x ← x + h·f(x, t). One evaluation per step."""
    return _integrate(_euler_step, f, x, ts, callback)


def midpoint(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Explicit midpoint (RK2), order 2: slope at a half Euler step. Two evaluations per step."""
    return _integrate(_midpoint_step, f, x, ts, callback)


def heun2(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Heun's method (explicit trapezoid), order 2: average of the slopes at both ends.

    The step that ends at t = 0 is a plain Euler step (Karras et al. 2022, Algorithm 1), so the
    field is never evaluated at t = 0 (where an x₀-prediction has no velocity). 2N − 1 evaluations.
    """
    return _integrate(_heun2_step, f, x, ts, callback)


def heun3(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Heun's third-order method (Heun 1900; nodes 0, 1/3, 2/3, weights 1/4, 0, 3/4). Three evaluations per step."""
    return _integrate(_heun3_step, f, x, ts, callback)


def rk4(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None) -> torch.Tensor:
    """Classical Runge–Kutta, order 4 (Kutta 1901). Four evaluations per step."""
    return _integrate(_rk4_step, f, x, ts, callback)
