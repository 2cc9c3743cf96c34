"""MONAI ``DiffusionModelUNet`` for 2D and 3D, with ``forward(x, t)`` and optional checkpointing.

The subclass keeps MONAI's module tree, so state-dict keys are MONAI's own (reference checkpoints
load unchanged). Only ``forward`` is rewritten: the same order of operations as MONAI's (time
embedding → conv_in → down blocks → mid block → up blocks with skips → out), without the
cross-attention / class / ControlNet inputs medgen does not use, and with each block optionally run
under ``torch.utils.checkpoint`` while training. ``t`` is model time, a float tensor ``(B,)``: MONAI's
sinusoidal embedding casts timesteps to float, so continuous times work as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint


class UNet(DiffusionModelUNet):
    """``DiffusionModelUNet`` whose forward is ``(x, t) -> y``; see the module docstring."""

    def __init__(self, *, gradient_checkpointing: bool = False, **monai_kwargs):
        super().__init__(**monai_kwargs)
        self.gradient_checkpointing = gradient_checkpointing

    def _run(self, block: nn.Module, **kwargs) -> torch.Tensor:
        """Call ``block``; recompute it in backward when checkpointing a training step."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, use_reentrant=False, **kwargs)
        return block(**kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C_in, *spatial), ``t`` (B,) float model time → (B, C_out, *spatial)."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = get_timestep_embedding(t, self.block_out_channels[0]).to(x.dtype)  # (B, C0)
        emb = self.time_embed(emb)  # (B, 4·C0)
        h = self.conv_in(x)  # (B, C0, *spatial)
        skips = [h]
        for block in self.down_blocks:
            h, res = self._run(block, hidden_states=h, temb=emb)
            skips.extend(res)
        h = self._run(self.middle_block, hidden_states=h, temb=emb)  # (B, C_last, *spatial/2^(L-1))
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, res = skips[:-n], skips[-n:]
            h = self._run(block, hidden_states=h, res_hidden_states_list=res, temb=emb)
        return self.out(h)  # (B, C_out, *spatial)


def build_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    attention_levels: Sequence[bool],
    num_res_blocks: int | Sequence[int],
    num_head_channels: int | Sequence[int],
    norm_num_groups: int = 32,
    dropout_cattn: float = 0.0,
    gradient_checkpointing: bool = False,
    use_flash_attention: bool = False,
) -> UNet:
    """The UNet of SYSTEM.md §4 from its knobs (2D or 3D by ``spatial_dims``).

    ``use_flash_attention`` selects MONAI's ``scaled_dot_product_attention`` path: same parameters,
    same function, less memory.
    """
    as_tuple = lambda v: v if isinstance(v, int) else tuple(int(i) for i in v)  # noqa: E731
    return UNet(
        spatial_dims=int(spatial_dims),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        channels=tuple(int(c) for c in channels),
        attention_levels=tuple(bool(a) for a in attention_levels),
        num_res_blocks=as_tuple(num_res_blocks),
        num_head_channels=as_tuple(num_head_channels),
        norm_num_groups=int(norm_num_groups),
        dropout_cattn=float(dropout_cattn),
        use_flash_attention=bool(use_flash_attention),
        gradient_checkpointing=bool(gradient_checkpointing),
    )
