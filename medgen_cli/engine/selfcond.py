"""Self-conditioning in training and validation (Chen et al. 2022, "Analog Bits"; ``train.self_conditioning``).

The network has extra x̂0 input channels (models/selfcond.py). For a training step, each sample is
picked with p = ``train.self_conditioning_prob`` by a keyed draw (seed, stream, step, global sample
index), so resume, batch composition and data-parallel ranks see the same choice. ``SelfCondNet`` then
stands in for the network in the loss:

1. a forward **without gradients** on the (already augmented) input with zeros in the x̂0 channels;
2. x̂0 from that prediction — rflow ``x_t + t·v̂`` (or the x₀ prediction), DDPM from ε or x₀ — detached,
   kept for the picked samples, zeros for the others;
3. the real forward with it; the loss and its gradient come from this call only.

The no-grad pass runs when any sample of the *global* batch is picked, so every data-parallel rank runs
the same number of forwards (FSDP gathers parameters in each). Time for x̂0 is the network's own time
``model_time / T`` (equal to t, or its grid point for discrete time). Validation (and one-step
evaluation, through ``trainer.diffusion_loss``) picks every sample: the regime of every sampling step
after the first. Sampling passes the previous evaluation's x̂0 (engine/sampling.py ``CountingNet``).
"""

from __future__ import annotations

import torch

from ..models.selfcond import channels
from ..runtime import rand_keyed, to_device


def picks(seed: int, stream: int, step: int, first: int, local: int, world: int, p: float, device):
    """(this rank's samples picked (local,) bool, whether any sample of the global batch is picked)."""
    keys = [(seed, stream, step, j) for j in range(local * world)]  # the whole global batch, on every rank
    u = rand_keyed(keys, device)  # (local·world,)
    use = u < p
    return use[first:first + local], bool(use.any())


class SelfCondNet:
    """``net`` with the two-pass self-conditioning of the module docstring; called like the network."""

    def __init__(self, net, strategy, n_image: int, use: torch.Tensor | None = None, run: bool = True):
        self.net, self.strategy, self.n = net, strategy, int(n_image)
        self.use, self.run = use, run  # use None: every sample

    def estimate(self, inp: torch.Tensor, mt: torch.Tensor, **kwargs) -> torch.Tensor:
        """x̂0 (B, n, …) from a no-grad forward with zero estimate channels, in the input's dtype."""
        zeros = inp.new_zeros((inp.shape[0], self.n, *inp.shape[2:]))
        with torch.no_grad():
            pred = self.net(inp, mt, x0_prev=zeros, **kwargs)
            t = mt.float().reshape(-1).expand(inp.shape[0]) / self.strategy.T
            x0 = self.strategy.x0_from(inp[:, :self.n].float(), pred.float(), t)
        return x0.to(inp.dtype).detach()

    def __call__(self, inp: torch.Tensor, mt: torch.Tensor, **kwargs) -> torch.Tensor:
        prev = None
        if self.run:
            prev = self.estimate(inp, mt, **kwargs)
            if self.use is not None:
                keep = to_device(self.use, inp.device).reshape(-1, *([1] * (inp.ndim - 1)))
                prev = torch.where(keep, prev, torch.zeros_like(prev))
        return self.net(inp, mt, x0_prev=prev, **kwargs)


def wrap_all(net, strategy):
    """``net`` as a SelfCondNet that picks every sample (validation, one-step evaluation); ``net`` itself
    when it is not self-conditioned or already wrapped."""
    if isinstance(net, SelfCondNet):
        return net
    n = channels(net)
    return SelfCondNet(net, strategy, n) if n else net
