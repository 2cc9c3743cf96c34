"""`medgen sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, DryRunOpt, JsonOpt, emit


def sample(
    run: Annotated[Optional[str], typer.Option(
        "--run", help="Run folder, step folder, .safetensors file, or '-' for checkpoint records.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")] = None,
    solver: Annotated[Optional[str], typer.Option("--solver", help="ODE solver (euler); DDPM uses ddim.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Number of solver steps.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Number of samples.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Noise of sample i uses seed + i.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Bravo mode: condition on the first n sorted masks of this split.")] = None,
    data: DataOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="ema | raw.")] = None,
    which: Annotated[Optional[str], typer.Option("--which", help="best | latest | step-N.")] = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate samples from a trained run: NIfTI (or 2D slices), PNG previews, sample records."""
    from ..jobs import sample as job

    opts = {"solver": solver, "steps": steps, "n": n, "seed": seed, "batch_size": batch_size,
            "split": split, "weights": weights, "which": which}
    for rec, human in job.run(run, out, opts, data, device, dry_run):
        emit(rec, human, as_json)
