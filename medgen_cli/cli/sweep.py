"""`medgen eval solvers` and `medgen eval optimal-steps` (registered on the eval app in cli/evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, JsonOpt, emit

RunOpt = Annotated[str, typer.Option("--run", help="Run folder, step folder or .safetensors file (rflow model).")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Sweep folder (resumable cache; default RUN/solver-sweep/<step>).")]
NOpt = Annotated[int, typer.Option("--n", help="Outputs per configuration (first n conditions of --split).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split of the conditioning masks (preset's).")]
RefOpt = Annotated[str, typer.Option(
    "--ref", help="ode: dopri5 at 1e-5 from the same noise; real: the conditions' real images (bravo).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Noise of output i uses seed + i.")]
FeatureRefOpt = Annotated[str, typer.Option(
    "--feature-ref", help="fid/kid/cmmd: the split (or folder) compared with, as `eval fid --ref`.")]


def solvers(
    run: RunOpt,
    out: OutOpt = None,
    n: NOpt = 4,
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", help="psnr | msssim | fid | kid | cmmd (repeatable; default: the preset's eval.metrics).")] = None,
    ref: RefOpt = "ode",
    feature_ref: FeatureRefOpt = "all",
    quick: Annotated[bool, typer.Option("--quick", help="Steps {10,50}, tolerances {1e-3,1e-5}.")] = False,
    restart: Annotated[bool, typer.Option("--restart/--no-restart", help="Include the Restart grid.")] = True,
    solver: Annotated[Optional[list[str]], typer.Option("--solver", help="Only these solvers (repeatable).")] = None,
    steps: Annotated[Optional[list[int]], typer.Option(
        "--steps", help="Fixed-step counts instead of {5,10,25,50,100} (repeatable).")] = None,
    split: SplitOpt = None,
    data: DataOpt = None,
    batch_size: BatchOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Solver grid (fixed x steps, adaptive x tolerances, Restart) on one model: table, NFE plot, records."""
    from ..jobs import sweep as job

    for rec, human in job.solvers(run, out, n, split, data, metric, ref, quick, restart, solver, device,
                                  batch_size, seed, steps=steps, feature_ref=feature_ref):
        emit(rec, human, as_json)


def optimal_steps(
    run: RunOpt,
    metric: Annotated[str, typer.Option(
        "--metric", help="psnr | msssim (maximised) | fid | kid | cmmd (minimised).")] = "psnr",
    solver: Annotated[str, typer.Option("--solver", help="Fixed-step solver.")] = "euler",
    lo: Annotated[int, typer.Option("--lo", help="Fewest steps searched.")] = 10,
    hi: Annotated[int, typer.Option("--hi", help="Most steps searched.")] = 50,
    tol: Annotated[int, typer.Option("--tol", help="Stop when the bracket is this narrow.")] = 1,
    out: OutOpt = None,
    n: NOpt = 4,
    ref: RefOpt = "ode",
    feature_ref: FeatureRefOpt = "all",
    split: SplitOpt = None,
    data: DataOpt = None,
    batch_size: BatchOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Golden-section search over the step count; evaluated points are cached with the solver sweep."""
    from ..jobs import sweep as job

    for rec, human in job.optimal_steps(run, metric, solver, lo, hi, tol, out, n, split, data, ref, device,
                                        batch_size, seed, feature_ref=feature_ref):
        emit(rec, human, as_json)
