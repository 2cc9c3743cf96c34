"""ODE solvers, one function per integrator, registered by name.

Signature (docs/ARCHITECTURE.md): ``solve(f, x, ts, *, callback=None) -> x`` where ``f(x, t)`` returns
dx/dt and ``ts`` is a decreasing 1-D tensor of normalised times from 1 to 0. Imports neither
``models`` nor ``diffusion``.
"""

from __future__ import annotations

from collections.abc import Callable

from medgen_cli.errors import UsageError, did_you_mean

from .adaptive import bosh3, dopri5, dopri8, fehlberg2
from .fixed import euler, heun2, heun3, midpoint, rk4

SOLVERS: dict[str, Callable] = {
    "euler": euler, "midpoint": midpoint, "heun2": heun2, "heun3": heun3, "rk4": rk4,  # fixed step
    "fehlberg2": fehlberg2, "bosh3": bosh3, "dopri5": dopri5, "dopri8": dopri8,  # adaptive (torchdiffeq)
}

# Evaluations of f per step of the fixed-step solvers (heun2 saves one on the final step to t = 0).
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
FIXED = tuple(EVALS_PER_STEP)
ADAPTIVE = ("fehlberg2", "bosh3", "dopri5", "dopri8")


def is_adaptive(name: str) -> bool:
    """True for the error-controlled solvers (they take ``atol``/``rtol`` and ignore the grid's interior)."""
    get_solver(name)
    return name in ADAPTIVE


def solve(name: str, f: Callable, x, ts, *, callback=None, atol: float | None = None, rtol: float | None = None):
    """Run solver ``name``; ``atol``/``rtol`` reach the adaptive ones (None: their default 1e-5) and are
    refused for fixed-step solvers (a tolerance there would silently mean nothing)."""
    fn = get_solver(name)
    tols = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    if tols and name not in ADAPTIVE:
        raise UsageError(f"--atol/--rtol apply to adaptive solvers, not '{name}'", "--atol/--rtol",
                         f"drop them, or use one of: {', '.join(ADAPTIVE)}")
    return fn(f, x, ts, callback=callback, **tols)


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


__all__ = ["ADAPTIVE", "EVALS_PER_STEP", "FIXED", "SOLVERS", "bosh3", "dopri5", "dopri8", "euler", "fehlberg2",
           "get_solver", "heun2", "heun3", "is_adaptive", "midpoint", "nfe", "rk4", "solve"]
