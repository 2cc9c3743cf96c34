"""DiffRS discriminator (Na et al. 2024; SYSTEM.md §9): a small head on the frozen UNet encoder.

The discriminator of a noisy input x_t (with its condition channels, exactly what the diffusion model
sees) at model time t is head(features), where features = the diffusion UNet's own time embedding →
conv_in → down blocks → middle block (the bottleneck, (B, C_last, *spatial / 2^(L-1))). The UNet stays
frozen; only the head trains. The head's logit estimates log p_data(x_t) / p_model(x_t).

Head: 1×1 conv C_last → 128, GroupNorm, SiLU; two blocks of stride-2 3×3 conv 128 → 128, GroupNorm,
SiLU; global average pooling; Linear(128 → 1). On the 3D reference UNet (C_last = 512) that is
951,553 parameters (SYSTEM.md: "about 0.95M").
"""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn


def encoder_features(unet: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's bottleneck features of input ``x`` (B, C_in, ...) at model time ``t`` (B,)."""
    t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
    emb = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0]).to(x.dtype))
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
    return unet.middle_block(hidden_states=h, temb=emb)


class DiffRSHead(nn.Module):
    """Bottleneck features (B, in_channels, ...) → logit (B,)."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int = 128, norm_num_groups: int = 32):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        g = min(norm_num_groups, width)
        layers: list[nn.Module] = [conv(in_channels, width, 1), nn.GroupNorm(g, width), nn.SiLU()]
        for _ in range(2):
            layers += [conv(width, width, 3, stride=2, padding=1), nn.GroupNorm(g, width), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.body(feats.float())
        return self.fc(h.flatten(2).mean(-1)).squeeze(-1)  # (B,)


class Discriminator(nn.Module):
    """``(x_t ⊕ cond, model time) → logit``: frozen ``unet`` encoder + trainable ``head``."""

    def __init__(self, unet: nn.Module, head: DiffRSHead):
        super().__init__()
        self.unet, self.head = unet, head
        self.unet.requires_grad_(False)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encoder_features(self.unet.eval(), x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, t))


def build_head(unet: nn.Module, width: int = 128, norm_num_groups: int = 32) -> DiffRSHead:
    dims = 3 if isinstance(unet.conv_in.conv, nn.Conv3d) else 2
    return DiffRSHead(dims, int(unet.block_out_channels[-1]), width, norm_num_groups)
