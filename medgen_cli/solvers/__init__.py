"""ODE solvers, one function per integrator, registered by name.

Signature (docs/ARCHITECTURE.md): ``solve(f, x, ts, *, callback=None) -> x`` where ``f(x, t)`` returns
dx/dt and ``ts`` is a decreasing 1-D tensor of normalised times from 1 to 0. Imports neither
``models`` nor ``diffusion``.
"""

from __future__ import annotations

from collections.abc import Callable

from medgen_cli.errors import UsageError, did_you_mean

from .adaptive import bosh3, dopri5, dopri8, fehlberg2
from .fixed import euler, heun2, midpoint, rk4

SOLVERS: dict[str, Callable] = {
    "euler": euler, "midpoint": midpoint, "heun2": heun2, "rk4": rk4,  # fixed step
    "fehlberg2": fehlberg2, "bosh3": bosh3, "dopri5": dopri5, "dopri8": dopri8,  # adaptive (torchdiffeq)
}

# Evaluations of f per step of the fixed-step solvers (heun2 saves one on the final step to t = 0).
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "rk4": 4}


def get_solver(name: str) -> Callable:
    """The solver registered as ``name``; unknown names raise UsageError with did-you-mean."""
    if name not in SOLVERS:
        hint = did_you_mean(name, SOLVERS) or f"choose one of: {', '.join(SOLVERS)}"
        raise UsageError(f"unknown solver '{name}'", "--solver", hint)
    return SOLVERS[name]


def nfe(name: str, steps: int) -> int | None:
    """Evaluations of f that ``name`` spends on ``steps`` steps; None for adaptive solvers (count them)."""
    get_solver(name)  # validates the name
    if name not in EVALS_PER_STEP:
        return None
    n = EVALS_PER_STEP[name] * int(steps)
    return n - 1 if name == "heun2" else n


__all__ = ["EVALS_PER_STEP", "SOLVERS", "bosh3", "dopri5", "dopri8", "euler", "fehlberg2", "get_solver", "heun2",
           "midpoint", "nfe", "rk4"]
