"""Generation: a trained network, a strategy and a solver turn noise into samples.

This is where diffusion strategies and solvers meet (they do not import each other). The network
call is wrapped in a counter, so the reported NFE is exactly the number of network evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CountingNet:
    """Calls `net(cat[x, cond], model_time)` and counts evaluations (one per batched call)."""

    net: nn.Module
    cond: torch.Tensor  # (B, C_cond, ...) possibly with 0 channels
    nfe: int = 0

    def __call__(self, x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        inp = torch.cat([x, self.cond.to(x.dtype)], dim=1)  # (B, C_img + C_cond, ...)
        return self.net(inp, model_t)


def batch_time(t, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=device).reshape(1).expand(batch)  # (B,)


@torch.no_grad()
def generate(net: nn.Module, strategy, noise: torch.Tensor, cond: torch.Tensor, solver: str = "euler",
             steps: int = 25, autocast=None) -> tuple[torch.Tensor, int]:
    """Integrate from pure noise (t=1) to data (t=0); returns (x0 estimate, NFE)."""
    import contextlib

    counted = CountingNet(net, cond)
    ctx = autocast or contextlib.nullcontext()
    with ctx:
        if getattr(strategy, "kind", "") == "ddpm" or solver == "ddim":
            x = strategy.ddim_sample(counted, noise, steps)
        else:
            from ..solvers import get_solver

            b = noise.shape[0]

            def drift(x, t):
                tb = batch_time(t, b, x.device)
                pred = counted(x, strategy.model_time(tb))
                return strategy.drift(pred.float(), x.float(), tb).to(x.dtype)

            ts = strategy.time_grid(steps)
            x = get_solver(solver)(drift, noise, ts)
    return x.float(), counted.nfe
