"""ControlNet two-stage training (SYSTEM.md §3 "ControlNet"; reference 3D exp6a / exp6b).

Stage 1 trains a plain UNet **unconditionally** (in = out channels). Stage 2 keeps that UNet (frozen by
default) and trains a ControlNet beside it: MONAI's ``ControlNet``, a copy of the UNet encoder + middle
block whose input is the noisy image, plus the mask embedded at pixel resolution (one 3×3 conv to
``embedding_channels`` = [16] then a zero-initialised conv to channels[0], added after ``conv_in``).
Zero-initialised 1×1 convolutions turn each encoder skip and the middle-block output into residuals,
scaled by ``conditioning_scale`` and added to the UNet's skips and middle-block output. Because every
residual path starts at zero, a fresh stage-2 model computes exactly the stage-1 model.

Both stages are one module, ``ControlledUNet``, with the usual medgen call ``model(cat[x_t, cond], t)``:
the channels after the UNet's ``in_channels`` are the condition (possibly none). Stage 1 (``controlnet is None``) drops them, so the
bravo-mode data and samplers work unchanged and the UNet sees 1 → 1 channels (the reference broke its
generation metrics by concatenating the mask into its 1-channel stage-1 model). Stage 2 sends them to
the ControlNet. Classifier-free guidance zeroes the mask (the trainer's per-sample
``train.cond_dropout`` = 0.15 trains that branch); a zeroed mask still passes through the ControlNet.

State-dict keys: ``unet.*`` (MONAI's DiffusionModelUNet keys under the prefix) and ``controlnet.*``.

Checkpoint design: a stage-2 checkpoint holds **both** the frozen UNet and the ControlNet (it is
self-contained: sampling, evaluation and resume need nothing else), and the run's config carries a
pointer to the stage-1 weights it started from (``controlnet.stage1_checkpoint``, the step folder, and
``controlnet.stage1_sha256``, the sha256 of that step's model index file, which itself lists every
shard's sha256), written when stage 2 starts. ``freeze_unet = false`` trains both parts jointly.
Frozen parameters have ``requires_grad = False`` and never receive gradients, so AdamW (and its
weight decay) leaves them untouched and EMA keeps them bit-identical (lerp towards an equal value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ControlNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint


def build_controlnet(unet: nn.Module, cond_channels: int, embedding_channels: Sequence[int] = (16,)) -> ControlNet:
    """A MONAI ControlNet mirroring ``unet``'s encoder (same knobs), mask of ``cond_channels`` channels."""
    u = unet
    return ControlNet(
        spatial_dims=_dims(u), in_channels=u.in_channels, num_res_blocks=tuple(u.num_res_blocks),
        channels=tuple(u.block_out_channels), attention_levels=tuple(u.attention_levels),
        norm_num_groups=u.down_blocks[0].resnets[0].norm1.num_groups, num_head_channels=u.num_head_channels,
        conditioning_embedding_in_channels=int(cond_channels),
        conditioning_embedding_num_channels=tuple(int(c) for c in embedding_channels),
        use_flash_attention=False)


def _dims(unet: nn.Module) -> int:
    conv = unet.conv_in.conv
    return 3 if isinstance(conv, nn.Conv3d) else 2


def copy_encoder(unet: nn.Module, cn: ControlNet) -> int:
    """Initialise the ControlNet's encoder (time embedding, conv_in, down blocks, middle block) from the
    UNet's (the usual "trainable copy"); returns the number of tensors copied. Zero convs stay zero."""
    src = unet.state_dict()
    own = cn.state_dict()
    n = 0
    for k, v in src.items():
        if k.split(".")[0] in ("time_embed", "conv_in", "down_blocks", "middle_block") and k in own \
                and own[k].shape == v.shape:
            own[k] = v.clone()
            n += 1
    cn.load_state_dict(own)
    return n


class ControlledUNet(nn.Module):
    """Stage 1: ``unet`` on the image channels alone. Stage 2: ``unet`` + ``controlnet`` on the condition."""

    def __init__(self, unet: nn.Module, controlnet: ControlNet | None = None, conditioning_scale: float = 1.0,
                 freeze_unet: bool = True):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale = float(conditioning_scale)
        self.freeze_unet = bool(freeze_unet and controlnet is not None)
        if self.freeze_unet:
            self.unet.requires_grad_(False)

    @property
    def middle_block(self) -> nn.Module:
        """The UNet's middle block (training tricks hook it)."""
        return self.unet.middle_block

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_unet:
            self.unet.eval()  # frozen: no dropout, whatever the trainer asks
        return self

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_img + C_cond, …) → image (B, C_img, …) and condition (B, C_cond, …; may be empty)."""
        n = self.unet.in_channels
        return x[:, :n], x[:, n:]

    def _ckpt(self, block: nn.Module, **kwargs):
        if getattr(self.unet, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return checkpoint(block, use_reentrant=False, **kwargs)
        return block(**kwargs)

    def control(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, emb_dtype) -> tuple[list, torch.Tensor]:
        """The ControlNet's residuals: one per UNet skip (conv_in output first) and the middle one."""
        cn = self.controlnet
        emb = cn.time_embed(get_timestep_embedding(t, cn.block_out_channels[0]).to(emb_dtype))
        h = cn.conv_in(x) + cn.controlnet_cond_embedding(cond.to(x.dtype))
        res = [h]
        for block in cn.down_blocks:
            h, r = self._ckpt(block, hidden_states=h, temb=emb)
            res.extend(r)
        h = self._ckpt(cn.middle_block, hidden_states=h, temb=emb)
        s = self.conditioning_scale
        down = [blk(r) * s for r, blk in zip(res, cn.controlnet_down_blocks)]
        return down, cn.controlnet_mid_block(h) * s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, cond = self.split(x)
        if self.controlnet is None:
            return self.unet(x, t)
        u = self.unet
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        down_res, mid_res = self.control(x, cond, t, x.dtype)
        emb = u.time_embed(get_timestep_embedding(t, u.block_out_channels[0]).to(x.dtype))
        h = u.conv_in(x)
        skips = [h]
        for block in u.down_blocks:
            h, res = u._run(block, hidden_states=h, temb=emb)
            skips.extend(res)
        skips = [s + r.to(s.dtype) for s, r in zip(skips, down_res)]
        h = u._run(u.middle_block, hidden_states=h, temb=emb) + mid_res.to(h.dtype)
        for block in u.up_blocks:
            n = len(block.resnets)
            skips, res = skips[:-n], skips[-n:]
            h = u._run(block, hidden_states=h, res_hidden_states_list=res, temb=emb)
        return u.out(h)


def unet_state(state: dict) -> dict:
    """The UNet's weights from a stage-1 (``unet.*``) or plain UNet state dict."""
    if any(k.startswith("unet.") for k in state):
        return {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    return dict(state)
