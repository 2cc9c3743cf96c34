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
    solver: Annotated[Optional[str], typer.Option(
        "--solver", help="euler midpoint heun2 heun3 rk4 | adaptive fehlberg2 bosh3 dopri5 dopri8 | ddim (DDPM).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Number of solver steps (grid for fixed solvers).")] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Adaptive solvers: absolute tolerance (1e-5).")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Adaptive solvers: relative tolerance (1e-5).")] = None,
    grid: Annotated[Optional[str], typer.Option(
        "--grid", help="Time grid: train (the training schedule's shift), uniform, or a shift ratio r.")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale w (1 = off); at t=1 with --cfg-end.")] = None,
    cfg_end: Annotated[Optional[float], typer.Option("--cfg-end", help="Dynamic CFG: scale reached at t=0.")] = None,
    restart: Annotated[Optional[str], typer.Option(
        "--restart", help="Restart sampling K,n,t_min,t_max (Euler, rflow); NFE = steps + K*n.")] = None,
    state_dtype: Annotated[Optional[str], typer.Option("--state-dtype", help="Solver state: fp32 | bf16.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Number of samples.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Noise of sample i uses seed + i.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Bravo mode: condition on the first n sorted masks of this split.")] = None,
    bins: Annotated[Optional[str], typer.Option(
        "--bins", help="Size-bin models: tumour counts per bin 0-3,3-6,6-10,10-15,15-20,20-30,>=30 mm "
                       "(e.g. 1,0,2,0,0,0,0); default: the bins of the --split masks.")] = None,
    modality: Annotated[Optional[str], typer.Option(
        "--modality", help="Multi-modality models: bravo | flair | t1_pre | t1_gd (default bravo).")] = None,
    data: DataOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="ema | raw.")] = None,
    which: Annotated[Optional[str], typer.Option("--which", help="best | latest | step-N.")] = None,
    paired: Annotated[bool, typer.Option(
        "--paired", help="Write a mask/image dataset (OUT/<out-split>/<id>/{seg,bravo}.nii.gz) with paired.jsonl.")] = False,
    mask_run: Annotated[Optional[str], typer.Option(
        "--mask-run", help="--paired: seg model that generates the masks (else masks of --split).")] = None,
    mask_steps: Annotated[Optional[int], typer.Option("--mask-steps", help="--paired: steps of the mask model.")] = None,
    atlas: Annotated[Optional[Path], typer.Option(
        "--atlas", help="--paired: brain atlas from `medgen data atlas`; tumours outside it are removed.")] = None,
    max_retries: Annotated[Optional[int], typer.Option(
        "--max-retries", help="--paired: redraws of a rejected mask (10).")] = None,
    max_tumour_fraction: Annotated[Optional[float], typer.Option(
        "--max-tumour-fraction", help="--paired: reject masks with any slice above this fraction (0.04).")] = None,
    out_split: Annotated[str, typer.Option("--out-split", help="--paired: split folder written under OUT.")] = "train",
    diffrs: Annotated[Optional[str], typer.Option(
        "--diffrs", help="DiffRS: rejection sampling with this head run (Euler, rflow, no CFG).")] = None,
    diffrs_backsteps: Annotated[Optional[int], typer.Option(
        "--diffrs-backsteps", help="DiffRS: grid steps to go back on a rejection (1); 0 = lightweight.")] = None,
    diffrs_gamma: Annotated[Optional[float], typer.Option(
        "--diffrs-gamma", help="DiffRS: quantile of the warm-up logits used as thresholds (0.75).")] = None,
    diffrs_warmup: Annotated[Optional[int], typer.Option(
        "--diffrs-warmup", help="DiffRS: warm-up trajectories for the thresholds (10).")] = None,
    diffrs_max_iter: Annotated[Optional[int], typer.Option(
        "--diffrs-max-iter", help="DiffRS: NFE budget of a trajectory before re-initialisation (8 x steps).")] = None,
    compile_: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="Fast path: bf16 weights, channels-last, torch.compile, CUDA graphs "
                                       "(first batch compiles: ~15-60 s).")] = None,
    device: DeviceOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate samples from a trained run: NIfTI (or 2D slices), PNG previews, sample records."""
    from ..jobs import sample as job

    opts = {"solver": solver, "steps": steps, "n": n, "seed": seed, "batch_size": batch_size,
            "split": split, "weights": weights, "which": which, "atol": atol, "rtol": rtol, "grid": grid,
            "cfg": cfg, "cfg_end": cfg_end, "restart": restart, "state_dtype": state_dtype,
            "max_retries": max_retries, "max_tumour_fraction": max_tumour_fraction, "bins": bins,
            "modality": modality, "diffrs": diffrs, "diffrs_backsteps": diffrs_backsteps,
            "diffrs_gamma": diffrs_gamma, "diffrs_warmup": diffrs_warmup, "diffrs_max_iter": diffrs_max_iter,
            "compile": compile_}
    pair = None
    if paired:
        pair = {"mask_run": mask_run, "mask_steps": mask_steps, "atlas": atlas, "out_split": out_split}
    elif any(v is not None for v in (mask_run, mask_steps, atlas)):
        from ..errors import UsageError

        raise UsageError("--mask-run/--mask-steps/--atlas belong to paired generation", "--paired",
                         "add --paired (or drop those options)")
    for rec, human in job.run(run, out, opts, data, device, dry_run, paired=pair):
        emit(rec, human, as_json)
