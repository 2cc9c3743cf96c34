"""Shared fixtures: a tiny phantom dataset, tiny presets, and an in-process CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share few cores: one intra-op thread each (and in their subprocesses)
    # avoids oversubscription, which made multi-process tests many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

class RandomPairs:
    """A map-style dataset of ``n`` random (image, mask) items for Trainer-level tests (``from conftest
    import RandomPairs``): images uniform in [0, 1], masks ``rand > threshold``; 3D items are 8 deep."""

    def __init__(self, dims: int = 2, n: int = 8, size: int = 16, threshold: float = 0.9):
        import torch

        g = torch.Generator().manual_seed(0)
        shape = (1, size, size) if dims == 2 else (1, 8, size, size)
        self.items = [{"image": torch.rand(shape, generator=g),
                       "cond": (torch.rand(shape, generator=g) > threshold).float()} for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


TINY_2D = """
description = "tiny 2D test model"
[data]
dims = 2
mode = "{mode}"
image_size = 16
[model]
kind = "unet"
channels = [8, 16]
attention_levels = [false, true]
num_res_blocks = 1
num_head_channels = 8
norm_num_groups = 8
[diffusion]
kind = "{strategy}"
[train]
epochs = 2
batch_size = 4
lr = 1e-3
warmup_epochs = 0.5
precision = "fp32"
log_every = 1
preview_every = 1
seed = 7
[sample]
steps = 3
n = 2
batch_size = 2
"""

TINY_3D = TINY_2D.replace("dims = 2", "dims = 3\npad_depth_to = 16\ndepth = 16").replace(
    "batch_size = 4", "batch_size = 1")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """3 train / 2 val / 1 test phantoms at 32x32x16 (tiny, fast, real NIfTI)."""
    from medgen_cli.data.phantom import synth_dataset

    root = tmp_path_factory.mktemp("phantoms") / "data"
    synth_dataset(root, n_train=3, n_val=2, n_test=1, size=32, depth=16, seed=3)
    return root


@pytest.fixture
def tiny_preset(tmp_path):
    """Write a tiny preset file: tiny_preset(dims=2, mode="bravo", strategy="rflow") -> path."""

    def make(dims: int = 2, mode: str = "bravo", strategy: str = "rflow", extra: str = "") -> Path:
        text = (TINY_2D if dims == 2 else TINY_3D).format(mode=mode, strategy=strategy) + extra
        path = tmp_path / f"tiny-{dims}d-{mode}-{strategy}.toml"
        path.write_text(text)
        return path

    return make


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `medgen ARGS` in-process; returns exit code, stdout and stderr."""
    from medgen_cli.cli.app import run

    def invoke(*args) -> Result:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
