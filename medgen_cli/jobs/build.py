"""From a validated preset to the parts: model, strategy, datasets, device. Shared by every job."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Preset
from ..errors import ConfigError, InputError


def model_args(preset: Preset) -> tuple[str, dict]:
    m = preset.model
    img, cond = preset.channels()
    kwargs = dict(spatial_dims=preset.data.dims, in_channels=img + cond, out_channels=img,
                  channels=list(m.channels), attention_levels=list(m.attention_levels),
                  num_res_blocks=m.num_res_blocks, num_head_channels=m.num_head_channels,
                  norm_num_groups=m.norm_num_groups, gradient_checkpointing=m.gradient_checkpointing)
    return m.kind, kwargs


def build_model(preset: Preset):
    """The preset's network, initialised from the run's seed (same weights on every machine)."""
    from ..models.registry import build_model as build
    from ..runtime import seeded

    kind, kwargs = model_args(preset)
    with seeded(preset.train.seed, 0):
        return build(kind, **kwargs)


def count_parameters(preset: Preset) -> int:
    from ..models.registry import count_parameters as count

    kind, kwargs = model_args(preset)
    return count(kind, **kwargs)


def build_strategy(preset: Preset):
    from ..diffusion import build_strategy as build

    args = preset.diffusion.model_dump()
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


def build_dataset(preset: Preset, split: str, root: Path | None = None):
    from ..data.datasets import SliceDataset, VolumeDataset

    d = preset.data
    root = root or data_root(preset)
    common = dict(root=root, split=split, mode=d.mode, image_size=d.image_size,
                  normalization=d.normalization, cache_dir=d.cache_dir)
    if d.dims == 2:
        return SliceDataset(**common)
    return VolumeDataset(**common, pad_depth_to=d.pad_depth_to, pad_mode=d.pad_mode)


def config_json(preset: Preset) -> str:
    from ..config import dump

    return json.dumps(dump(preset), sort_keys=True)
