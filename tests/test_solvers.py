"""Fixed-step solvers: convergence orders on dx/dt = a·x, registry, time precision, callbacks."""

from __future__ import annotations

import math

import pytest
import torch

from medgen_cli.errors import UsageError
from medgen_cli.solvers import SOLVERS, get_solver, nfe

ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


def _error(name: str, steps: int, a: float = 1.3) -> float:
    """|x(0) − exact| for dx/dt = a·x from x(1) = 1 to t = 0 (exact e^{−a})."""
    f = lambda x, t: a * x  # noqa: E731
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = get_solver(name)(f, torch.ones(1, dtype=torch.float64), ts)
    return abs(x.item() - math.exp(-a))


ADAPTIVE = sorted(set(SOLVERS) - set(ORDERS))


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order(name):
    errors = [_error(name, n) for n in (8, 16, 32)]
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(ORDERS[name], abs=0.3), errors


@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_solvers_meet_tolerance(name, dtype):
    seen, ends = [], []

    def f(x, t):
        seen.append(x.dtype)
        return 1.3 * x

    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    x = get_solver(name)(f, torch.ones(3, dtype=dtype), ts, callback=lambda k, t, x: ends.append(float(t)))
    tol = 1e-2 if dtype == torch.bfloat16 else 5e-3 if name == "fehlberg2" else 1e-4  # order 2(1) is loose
    assert x.dtype == dtype and set(seen) == {dtype} and ends == [0.0]
    torch.testing.assert_close(x.float(), torch.full((3,), math.exp(-1.3)), rtol=tol, atol=tol)
    assert nfe(name, 10) is None


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_time_stays_precise_with_bf16_state(name):
    seen = []

    def f(x, t):
        seen.append(t)
        return torch.ones_like(x)

    ts = torch.tensor([1.0, 0.7, 0.3, 0.0], dtype=torch.float64)
    steps = []
    x = get_solver(name)(f, torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16), ts,
                         callback=lambda k, t, x: steps.append((k, float(t))))
    assert x.dtype == torch.bfloat16
    torch.testing.assert_close(x.float(), torch.full_like(x.float(), -1.0))  # ∫₁⁰ 1 dt = −1
    assert all(t.dtype == torch.float64 for t in seen)
    assert float(seen[0]) == 1.0 and min(float(t) for t in seen) >= 0.0
    assert steps == [(0, 0.7), (1, 0.3), (2, 0.0)]
    assert len(seen) == nfe(name, 3)


def test_heun2_never_evaluates_at_zero():
    seen = []
    get_solver("heun2")(lambda x, t: seen.append(float(t)) or x, torch.ones(1), torch.linspace(1, 0, 5))
    assert 0.0 not in seen and len(seen) == nfe("heun2", 4) == 7


def test_unknown_solver_is_usage_error_with_suggestion():
    with pytest.raises(UsageError) as err:
        get_solver("eular")
    assert "euler" in err.value.hint and err.value.where == "--solver"
