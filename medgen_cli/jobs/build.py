"""From a validated preset to the parts: model, strategy, datasets, device. Shared by every job."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Preset
from ..errors import ConfigError, InputError


def model_args(preset: Preset) -> tuple[str, dict]:
    m = preset.model
    img, cond = preset.channels()
    cond -= preset.vector_channels()  # vector conditions do not enter conv_in (models/conditioning.py)
    if preset.controlnet.stage:  # controlnet: the UNet is unconditional, the mask goes to the ControlNet
        cond = 0
    img, cond = (c * preset.space.factor ** preset.data.dims for c in (img, cond))  # s2d/wavelet: 2^dims x
    sc = self_cond_channels(preset)  # self-conditioning: x̂0 channels after the image (models/selfcond.py)
    if m.kind == "dit":
        return m.kind, dit_args(preset, img, cond + sc)
    kwargs = dict(spatial_dims=preset.data.dims, in_channels=img + sc + cond, out_channels=img,
                  channels=list(m.channels), attention_levels=list(m.attention_levels),
                  num_res_blocks=m.num_res_blocks, num_head_channels=m.num_head_channels,
                  norm_num_groups=m.norm_num_groups, gradient_checkpointing=m.gradient_checkpointing,
                  use_flash_attention=m.sdpa_attention)
    return m.kind, kwargs


def build_model(preset: Preset):
    """The preset's network, initialised from the run's seed (same weights on every machine)."""
    from ..models.registry import build_model as build
    from ..runtime import seeded

    kind, kwargs = model_args(preset)
    with seeded(preset.train.seed, 0):
        return wrap_for_self_cond(preset, wrap_for_omega(preset, wrap_for_mode(preset, build(kind, **kwargs))))


def self_cond_channels(preset: Preset) -> int:
    """Extra x̂0 input channels of a self-conditioned model (its image channels in the model's space), else 0."""
    if preset.train.self_conditioning != "x0":
        return 0
    return preset.channels()[0] * preset.space.factor ** preset.data.dims


def wrap_for_self_cond(preset: Preset, model):
    """Self-conditioning: the outermost module accepts ``x0_prev=`` (models/selfcond.py)."""
    n = self_cond_channels(preset)
    if not n:
        return model
    from ..models.selfcond import enable

    return enable(model, n)


def wrap_for_mode(preset: Preset, model):
    """The mode's conditioning around the network (multi: mode embedding; seg_conditioned: size-bin FiLM)."""
    if preset.controlnet.stage:  # controlnet
        return wrap_controlnet(preset, model)
    if preset.data.mode not in ("multi", "seg_conditioned"):
        return model
    from ..models.conditioning import wrap

    c = preset.conditioning
    return wrap(model, preset.data.mode, list(preset.model.channels), c.mode_embedding, c.mode_dropout,
                c.late_start_level, c.size_bins, c.max_count)


# --- scoreaug/sda ---
def wrap_for_omega(preset: Preset, model):
    """ScoreAug with omega: the 36-d omega embedding added to the time embedding (models/conditioning.py)."""
    sa = preset.train.scoreaug
    if sa is None or not sa.omega:
        return model
    from ..models.conditioning import OmegaConditioned

    return OmegaConditioned(model, identity_flag=preset.compat.scoreaug_identity_flag,
                            mode_intensity_channels=preset.channels()[0] if sa.mode_intensity else 0)


def count_parameters(preset: Preset) -> int:
    """Parameters of ``build_model(preset)``, built on the meta device (no memory)."""
    import torch

    from ..models.registry import build_model as build

    kind, kwargs = model_args(preset)
    with torch.device("meta"):
        model = wrap_for_self_cond(preset, wrap_for_omega(preset, wrap_for_mode(preset, build(kind, **kwargs))))
    return sum(p.numel() for p in model.parameters())


def build_strategy(preset: Preset):
    from ..diffusion import build_strategy as build

    args = preset.diffusion.model_dump()
    if preset.compat.pixel_base_shift and args["kind"] == "rflow":  # the reference's r = 1/2 (spaces.py)
        args["shift"] *= 1.0 / preset.space.factor
    return build(args.pop("kind"), **args)


def data_root(preset: Preset) -> Path:
    if not preset.data.root:
        raise ConfigError("no dataset given", "--data",
                          "pass --data DIR (BrainMetShare layout) or set data.root; "
                          "`medgen data synth DIR` writes a phantom dataset")
    root = Path(preset.data.root).expanduser()
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}", "--data", "check the path")
    return root


# compat.reference_bin_spacing: the (x, y, z) mm the reference's 3D modes hard-coded for size bins,
# i.e. (D, H, W) = (1.0, 0.9375, 0.9375) whatever the image size (SYSTEM.md §1).
REFERENCE_BIN_SPACING = (0.9375, 0.9375, 1.0)


def build_dataset(preset: Preset, split: str, root: Path | None = None, train: bool = False):
    """The split's dataset; ``train`` turns on the preset's 2D augmentation (keyed by train.seed)."""
    from ..data.datasets import SliceDataset, VolumeDataset

    d = preset.data
    root = root or data_root(preset)
    common = dict(root=root, split=split, mode=d.mode, image_size=d.image_size,
                  normalization=d.normalization, cache_dir=d.cache_dir, spacing=d.spacing,
                  max_count=preset.conditioning.max_count, sampled_feret=preset.compat.sampled_feret,
                  bin_spacing=REFERENCE_BIN_SPACING if preset.compat.reference_bin_spacing else None)
    if d.dims == 2:
        return SliceDataset(**common, augment=d.augment if train else "none", seed=preset.train.seed)
    return VolumeDataset(**common, pad_depth_to=d.pad_depth_to, pad_mode=d.pad_mode)


def config_json(preset: Preset) -> str:
    from ..config import dump

    return json.dumps(dump(preset), sort_keys=True)


# ---- DiT and spaces (models/dit.py, spaces.py) ---------------------------------------------------
def space_shape(preset: Preset, channels: int | None = None) -> tuple[int, ...]:
    """(C, *spatial) of the model's image tensor: the pixel shape of ``channels`` (default the mode's
    image channels) after the space's transform."""
    d = preset.data
    c = preset.channels()[0] if channels is None else channels
    spatial = (d.image_size,) * 2 if d.dims == 2 else (d.pad_depth_to, d.image_size, d.image_size)
    f = preset.space.factor
    return (c * f**d.dims, *(s // f for s in spatial))


def dit_args(preset: Preset, img: int, cond: int) -> dict:
    """DiT knobs: channels in the space, input size = the space's spatial shape (fixes the token grid)."""
    m = preset.model
    return dict(spatial_dims=preset.data.dims, input_size=space_shape(preset)[1:], in_channels=img + cond,
                out_channels=img, variant=m.variant, patch_size=m.patch_size, hidden_size=m.hidden_size,
                depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate,
                gradient_checkpointing=m.gradient_checkpointing)


def build_space(preset: Preset, train_ds=None):
    """The preset's space. With ``space.normalize`` and no stored statistics, estimates them from
    ``train_ds`` (at most ``space.normalize_items`` items) and writes them into ``preset.space.stats``,
    so config.json and every checkpoint carry them."""
    from ..spaces import Space, estimate_stats

    sp, dims = preset.space, preset.data.dims
    if sp.normalize and sp.stats is None:
        if train_ds is None:
            raise ConfigError("the wavelet normalisation statistics are missing", "space.stats",
                              "they are written when training starts; use a run trained with space.normalize")
        plain = Space(sp.kind, dims, sp.rescale)
        mean, std, n = estimate_stats(plain, train_ds, sp.normalize_items)
        sp.stats = {"mean": mean, "std": std, "items": n}
    stats = sp.stats if sp.normalize else None
    return Space(sp.kind, dims, sp.rescale, stats.mean if stats else None, stats.std if stats else None)


# --- controlnet ---------------------------------------------------------------------------
def wrap_controlnet(preset: Preset, unet):
    """Stage 1: the UNet on the image channels alone; stage 2: + a fresh ControlNet (zero residuals)."""
    from ..models.controlnet import ControlledUNet, build_controlnet

    cn = preset.controlnet
    net = build_controlnet(unet, preset.channels()[1], cn.embedding_channels) if cn.stage == 2 else None
    return ControlledUNet(unet, net, cn.conditioning_scale, cn.freeze_unet)


def load_stage1(preset: Preset, model) -> None:
    """Stage 2 starts from the stage-1 UNet: load it into ``model.unet``, copy its encoder into the
    ControlNet (``controlnet.copy_encoder``) and write the pointer (step folder, sha256 of its model
    index, weights taken) into ``preset.controlnet`` so config.json and every checkpoint carry it."""
    import hashlib

    from .. import checkpoint as ckpt
    from ..models.controlnet import copy_encoder, unet_state

    cn = preset.controlnet
    if not cn.stage1_run:
        raise ConfigError("stage 2 needs the stage-1 run", "controlnet.stage1_run",
                          "train the stage-1 preset first, then --set controlnet.stage1_run=RUN_DIR")
    ck = ckpt.load_checkpoint(Path(cn.stage1_run).expanduser(), cn.stage1_which, cn.stage1_weights)
    try:
        model.unet.load_state_dict(unet_state(ck.model_state))
    except RuntimeError as e:
        raise ConfigError(f"the stage-1 weights do not fit this UNet: {str(e).splitlines()[0]}",
                          "controlnet.stage1_run", "stage 1 and stage 2 need the same [model] and data.mode") from e
    if cn.copy_encoder:
        copy_encoder(model.unet, model.controlnet)
    step = Path(ck.step_dir)
    index = step / "model.safetensors.index.json" if step.is_dir() else step
    cn.stage1_checkpoint = str(step.resolve())
    cn.stage1_sha256 = hashlib.sha256(index.read_bytes()).hexdigest()
    cn.stage1_loaded = ck.weights
