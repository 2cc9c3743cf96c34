"""Adaptive-step integrators, delegated to torchdiffeq (reused, not rewritten).

Same signature as the fixed-step solvers; only the end points ts[0] → ts[−1] are used, the step
sizes are chosen by the error controller (default tolerances atol = rtol = 1e-5, as in the
reference). The state is integrated in at least fp32 (a bf16 state makes the error estimate
useless); ``f`` still receives x in its original dtype. ``callback(0, ts[−1], x)`` runs once at the
end. The number of evaluations is known only afterwards: count calls of ``f`` if you need it.
"""

from __future__ import annotations

import torch
from torchdiffeq import odeint

from .fixed import Field

TOL = 1e-5


def _odeint(method: str, f: Field, x: torch.Tensor, ts: torch.Tensor, callback, atol: float, rtol: float):
    """Integrate dx/dt = f(x, t) from ts[0] to ts[−1] with torchdiffeq's ``method``."""
    work = torch.promote_types(x.dtype, torch.float32)
    span = torch.stack([ts[0], ts[-1]]).to(torch.float64)  # (2,) decreasing
    field = lambda t, y: f(y.to(x.dtype), t).to(work)  # noqa: E731  torchdiffeq calls f(t, y)
    out = odeint(field, x.to(work), span, method=method, atol=atol, rtol=rtol)[-1].to(x.dtype)
    if callback is not None:
        callback(0, ts[-1], out)
    return out


def dopri5(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None, atol=TOL, rtol=TOL):
    """Dormand–Prince 5(4) embedded Runge–Kutta pair (Dormand & Prince 1980), adaptive."""
    return _odeint("dopri5", f, x, ts, callback, atol, rtol)


def dopri8(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None, atol=TOL, rtol=TOL):
    """Dormand–Prince 8(7) pair (Prince & Dormand 1981), adaptive."""
    return _odeint("dopri8", f, x, ts, callback, atol, rtol)


def bosh3(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None, atol=TOL, rtol=TOL):
    """Bogacki–Shampine 3(2) pair (Bogacki & Shampine 1989), adaptive."""
    return _odeint("bosh3", f, x, ts, callback, atol, rtol)


def fehlberg2(f: Field, x: torch.Tensor, ts: torch.Tensor, *, callback=None, atol=TOL, rtol=TOL):
    """Runge–Kutta–Fehlberg 2(1) pair (Fehlberg 1969), adaptive."""
    return _odeint("fehlberg2", f, x, ts, callback, atol, rtol)
