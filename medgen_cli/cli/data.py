"""`medgen data synth|check|prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOpt

app = typer.Typer(help="Make, check and prepare datasets in the BrainMetShare layout.", no_args_is_help=True)


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output dataset root (must not exist or be empty).")],
    n_train: Annotated[int, typer.Option("--train", help="Training patients.")] = 6,
    n_val: Annotated[int, typer.Option("--val", help="Validation patients.")] = 2,
    n_test: Annotated[int, typer.Option("--test", help="test_new patients.")] = 2,
    size: Annotated[int, typer.Option("--size", help="In-plane size (field of view 240 mm).")] = 256,
    depth: Annotated[int, typer.Option("--depth", help="Slices (1 mm).")] = 150,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write the deterministic phantom dataset (head, brain, ventricles, metastases, oedema)."""
    from ..jobs import data as job

    print(job.synth(out, n_train, n_val, n_test, size, depth, seed))


@app.command("check")
def check(
    root: Annotated[Path, typer.Argument(help="Dataset root to check.")],
    as_json: JsonOpt = False,
) -> None:
    """List every problem of a dataset folder; exit 4 if there is an error."""
    from ..jobs import data as job

    job.report_check(root, as_json)


@app.command("prepare")
def prepare(
    raw: Annotated[Path, typer.Argument(help="The public BrainMetShare release folder.")],
    out: Annotated[Path, typer.Argument(help="Output dataset root.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the val/test_new split.")] = 42,
    size: Annotated[int, typer.Option("--size")] = 256,
    depth: Annotated[int, typer.Option("--depth")] = 150,
) -> None:
    """Convert the raw release: pad/resize to 256, align to 150 slices, split test into val/test_new."""
    from ..jobs import data as job

    print(job.prepare(raw, out, seed, size, depth))


@app.command("atlas")
def atlas(
    root: Annotated[Path, typer.Argument(help="Dataset root in the BrainMetShare layout.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Atlas file (default ROOT/atlas-<size>.nii.gz).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split the atlas is built from.")] = "train",
    size: Annotated[int | None, typer.Option("--size", help="In-plane size of the model it serves.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Normalised bravo intensity that counts as brain.")] = 0.05,
) -> None:
    """Build the brain atlas (union of brain masks of a split) that paired generation checks masks against."""
    from ..jobs import data as job

    print(job.atlas(root, out, split, size, threshold))
