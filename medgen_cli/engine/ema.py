"""Exponential moving average of the model weights.

Updated every `every` optimizer steps from `start_step` on, with the usual decay warm-up
(decay_k = min(decay, 1 - (1 + k)^(-2/3)) for the k-th update) so early averages are not stuck at
the initial weights. Buffers are copied. The state is plain tensors (saved as safetensors).
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int, every: int):
        self.decay, self.start_step, self.every = decay, start_step, every
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if step < self.start_step or (step - self.start_step) % self.every:
            return
        d = self.current_decay()
        shadow, live = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                shadow.append(s)
                live.append(v.detach().to(s.dtype))
            else:
                s.copy_(v)
        if shadow:  # one multi-tensor kernel instead of one launch per tensor
            torch._foreach_lerp_(shadow, live, 1.0 - d)
        self.updates += 1

    def state(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "every": self.every,
                "updates": self.updates}

    def load(self, tensors: dict, state: dict) -> None:
        for k, v in tensors.items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)
