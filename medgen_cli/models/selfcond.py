"""Self-conditioning input channels (Chen et al. 2022, "Analog Bits"): the network's extra x̂0 input.

A self-conditioned network has ``n`` more input channels than the plain one, ``n`` = its image channels
(in the model's space). ``enable(model, n)`` attaches a forward pre-hook to the network's outermost
module; every caller keeps calling ``model(cat[x_t, cond], t, ...)`` and may pass ``x0_prev=`` (B, n, …),
the previous clean-data estimate. The hook inserts it right after the image channels:

    cat[x_t, cond]  →  cat[x_t, x0_prev, cond]        (x0_prev = zeros when not given)

so conditions keep their place at the end (the trailing vector channels of multi / seg_conditioned,
the mask of ControlNet after ``unet.in_channels``), and callers that know nothing of self-conditioning
(one-step evaluation, previews) get the first-evaluation behaviour (zeros). State-dict keys and module
attributes are those of the plain network (only ``conv_in`` / the patch embedding is wider).

``channels(net)`` tells whether a (possibly DDP- or torch.compile-wrapped) network is self-conditioned.
Who fills ``x0_prev``: the trainer (engine/selfcond.py) and the samplers (engine/sampling.py).
"""

from __future__ import annotations

import torch
from torch import nn

ATTR = "self_cond_channels"


def _insert(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: cat[x_t, cond] → cat[x_t, x0_prev or zeros, cond]."""
    prev = kwargs.pop("x0_prev", None)
    x, n = args[0], getattr(module, ATTR)
    if prev is None:
        prev = x.new_zeros((x.shape[0], n, *x.shape[2:]))
    elif prev.shape[0] != x.shape[0] or prev.shape[1] != n or prev.shape[2:] != x.shape[2:]:
        raise ValueError(f"x0_prev has shape {tuple(prev.shape)}, the input {tuple(x.shape)} needs "
                         f"({x.shape[0]}, {n}, ...)")
    x = torch.cat([x[:, :n], prev.to(x.dtype), x[:, n:]], dim=1)
    return (x, *args[1:]), kwargs


def enable(model: nn.Module, n_image: int) -> nn.Module:
    """Make ``model`` (built with ``n_image`` extra input channels) accept ``x0_prev=``; returns it."""
    setattr(model, ATTR, int(n_image))
    model.register_forward_pre_hook(_insert, with_kwargs=True)
    return model


def channels(net) -> int:
    """The x̂0 channels a network takes (0: not self-conditioned); sees through DDP/FSDP and compile."""
    seen = set()
    while net is not None and id(net) not in seen:
        seen.add(id(net))
        n = getattr(net, ATTR, None) if isinstance(net, nn.Module) else None
        if n:
            return int(n)
        net = (getattr(net, "module", None) or getattr(net, "_orig_mod", None)
               or getattr(net, "_fsdp_wrapped_module", None))
    return 0
