"""Learning-rate schedules, a pure function of the optimizer step (so resume needs no state).

Warm-up is linear from 0.1x to 1x over `warmup_epochs`; `cosine` then anneals to `eta_min` by the
end of training, `constant` stays flat. Epochs are converted to steps with `steps_per_epoch`.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float,
          kind: str = "cosine", eta_min: float = 1e-6) -> float:
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return base_lr * (0.1 + 0.9 * step / warm)
    if kind == "constant":
        return base_lr
    total = max(epochs * steps_per_epoch - warm, 1)
    progress = min((step - warm) / total, 1.0)
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))
