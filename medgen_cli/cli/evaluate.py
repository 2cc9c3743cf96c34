"""`medgen eval <metric>`: image metrics on paired data, or one-step x0 reconstructions of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import DataOpt, DeviceOpt, JsonOpt, emit

app = typer.Typer(help="Evaluate samples or runs; emits metric records.", no_args_is_help=True)

GenOpt = Annotated[Optional[str], typer.Option(
    "--gen", help="Generated samples: a folder, or '-' for sample records on stdin.")]
RefOpt = Annotated[Optional[Path], typer.Option("--ref", help="Reference folder paired with --gen.")]
RunOpt = Annotated[Optional[Path], typer.Option(
    "--run", help="Run (or step folder): one-step x0 reconstructions on --split (SYSTEM.md §9).")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="Split for --run (default: preset's).")]
MaxOpt = Annotated[Optional[list[str]], typer.Option("--max", help="Fail (exit 6) if name > value.")]
MinOpt = Annotated[Optional[list[str]], typer.Option("--min", help="Fail (exit 6) if name < value.")]
ItemsOpt = Annotated[Optional[int], typer.Option("--max-items", help="Evaluate at most this many items.")]


PairedWeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", help="Network weights file; else $MEDGEN_WEIGHTS_<NAME>, $MEDGEN_WEIGHTS_DIR, the torch hub cache.")]


def _metric(name: str):
    def command(gen: GenOpt = None, ref: RefOpt = None, run: RunOpt = None, split: SplitOpt = None,
                data: DataOpt = None, max_items: ItemsOpt = None, max_: MaxOpt = None,
                min_: MinOpt = None, device: DeviceOpt = None, as_json: JsonOpt = False) -> None:
        _paired(name, gen, ref, run, split, data, max_items, max_, min_, device, as_json, None)

    def with_weights(gen: GenOpt = None, ref: RefOpt = None, run: RunOpt = None, split: SplitOpt = None,
                     data: DataOpt = None, weights: PairedWeightsOpt = None, max_items: ItemsOpt = None,
                     max_: MaxOpt = None, min_: MinOpt = None, device: DeviceOpt = None,
                     as_json: JsonOpt = False) -> None:
        _paired(name, gen, ref, run, split, data, max_items, max_, min_, device, as_json, weights)

    if name in ("lpips", "perceptual-radimagenet"):
        command = with_weights

    command.__doc__ = {"psnr": "PSNR in dB on [0,1] (per sample, capped at 100 dB, averaged).",
                       "msssim": "MS-SSIM (2D; slice-wise and volumetric for 3D volumes).",
                       "ssim": "SSIM (MONAI, Gaussian 11, sigma 1.5; 3D: slice-wise and volumetric).",
                       "lpips": "Standard LPIPS (AlexNet, v0.1), slice-wise for volumes.",
                       "perceptual-radimagenet": "The reference's 'LPIPS': MONAI PerceptualLoss with the RadImageNet "
                                                 "ResNet50 (paired; volumes slice-wise in chunks of 32)."}[name]
    return command


def _paired(name, gen, ref, run, split, data, max_items, max_, min_, device, as_json, weights) -> None:
    from ..jobs import evaluate as job

    results = job.run(name, gen=gen, ref=ref, run=run, split=split, data=data,
                      max_items=max_items, device=device, weights=weights)
    for rec, human in results:
        emit(rec, human, as_json)
    job.check_thresholds([r for r, _ in results], max_ or [], min_ or [])


app.command("psnr")(_metric("psnr"))
app.command("msssim")(_metric("msssim"))
app.command("ssim")(_metric("ssim"))
app.command("lpips")(_metric("lpips"))
app.command("perceptual-radimagenet")(_metric("perceptual-radimagenet"))

# ---- distribution metrics ----------------------------------------------------------------------
DistRefOpt = Annotated[Optional[str], typer.Option(
    "--ref", help="train|val|test|all (data root from the sample records, else --data) or a folder.")]
ExtractorOpt = Annotated[Optional[str], typer.Option(
    "--extractor", help="resnet50-imagenet (FID/KID default) | biomedclip (CMMD default) | radimagenet-resnet50 | "
                        "inception-v3 (the literature's FID network) | inception-v3-torchvision.")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", help="Weights file (or snapshot folder); else $MEDGEN_WEIGHTS_<NAME>, then the caches.")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="KID/CMMD: reference | standard | both.")]
PlanesOpt = Annotated[str, typer.Option("--planes", help="axial (reference) | tri (axial+coronal+sagittal).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of subsets and bootstrap draws.")]
CiOpt = Annotated[bool, typer.Option("--ci", help="Add 95% bootstrap intervals (volumes resampled).")]
CiNOpt = Annotated[int, typer.Option("--ci-replicates", help="Bootstrap replicates.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="bf16 | fp32 (default: bf16 on CUDA).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write cached reference features.")]
ModalityOpt = Annotated[str, typer.Option("--modality", help="Modality file evaluated (bravo).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Reader processes (default: one per CPU but one, ≤16; 0: read in the main process).")]


def _dist(name: str):
    def command(gen: GenOpt = None, ref: DistRefOpt = None, data: DataOpt = None, extractor: ExtractorOpt = None,
                weights: WeightsOpt = None, protocol: ProtocolOpt = "both", planes: PlanesOpt = "axial",
                seed: SeedOpt = 42, ci: CiOpt = False, ci_replicates: CiNOpt = 100, precision: PrecisionOpt = None,
                no_cache: NoCacheOpt = False, modality: ModalityOpt = "bravo", workers: WorkersOpt = None,
                max_items: ItemsOpt = None, max_: MaxOpt = None, min_: MinOpt = None, device: DeviceOpt = None,
                as_json: JsonOpt = False) -> None:
        from ..errors import UsageError
        from ..jobs import evaluate as job

        if gen is None:
            raise UsageError(f"{name} needs generated samples", "--gen", "pass --gen SAMPLE_FOLDER (or '-')")
        results = job.feature_metric(name, gen, ref, data=data, extractor=extractor, weights=weights,
                                     protocol=protocol, planes=planes, modality=modality, seed=seed, ci=ci,
                                     ci_replicates=ci_replicates, device=device, precision=precision,
                                     cache=not no_cache, max_items=max_items, workers=workers)
        for rec, human in results:
            emit(rec, human, as_json)
        job.check_thresholds([r for r, _ in results], max_ or [], min_ or [])

    command.__doc__ = {
        "fid": "FID of samples against a split or folder (ResNet50-ImageNet features, the reference's).",
        "kid": "KID, reference (50x100) and standard (100x1000) protocols.",
        "cmmd": "CMMD (BiomedCLIP), reference (sqrt unbiased, median bandwidth) and standard (sigma 10, x1000)."}[name]
    return command


for _n in ("fid", "kid", "cmmd"):
    app.command(_n)(_dist(_n))


@app.command("seg")
def seg(pred: Annotated[Optional[str], typer.Option("--pred", help="Folder of predicted masks.")] = None,
        ref: RefOpt = None,
        threshold: Annotated[float, typer.Option("--threshold", help="Soft predictions: foreground if > this.")] = 0.5,
        hd_voxels: Annotated[bool, typer.Option("--hd-voxels", help="HD95 in voxels instead of mm.")] = False,
        spacing: Annotated[Optional[str], typer.Option("--spacing", help="Override x,y,z mm.")] = None,
        max_items: ItemsOpt = None, max_: MaxOpt = None, min_: MinOpt = None, as_json: JsonOpt = False) -> None:
    """Dice, IoU, precision, recall, HD95; pooled voxel Dice; reference per-lesion Dice by RANO-BM class."""
    from ..errors import UsageError
    from ..jobs import evaluate as job

    if pred is None:
        raise UsageError("seg needs predictions", "--pred", "pass --pred FOLDER --ref FOLDER")
    results = job.seg_metric(pred, ref, threshold, hd_voxels, _spacing(spacing), max_items)
    for rec, human in results:
        emit(rec, human, as_json)
    job.check_thresholds([r for r, _ in results], max_ or [], min_ or [])


@app.command("bins")
def bins(gen: Annotated[Optional[str], typer.Option("--gen", help="Folder of generated masks.")] = None,
         ref: Annotated[Optional[Path], typer.Option(
             "--ref", help="Requested masks paired by relative path (default: the records' conditions).")] = None,
         spacing: Annotated[Optional[str], typer.Option("--spacing", help="Override x,y,z mm.")] = None,
         compat_sampled: Annotated[bool, typer.Option("--compat-sampled-feret")] = False,
         max_items: ItemsOpt = None, max_: MaxOpt = None, min_: MinOpt = None, as_json: JsonOpt = False) -> None:
    """Size-bin adherence: exact match, presence, count, per-bin accuracy, MAE."""
    from ..errors import UsageError
    from ..jobs import evaluate as job

    if gen is None:
        raise UsageError("bins needs generated masks", "--gen", "pass --gen FOLDER")
    results = job.bins_metric(gen, ref, _spacing(spacing), max_items, compat_sampled)
    for rec, human in results:
        emit(rec, human, as_json)
    job.check_thresholds([r for r, _ in results], max_ or [], min_ or [])


def _spacing(text):
    from ..errors import UsageError

    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) <= 0:
        raise UsageError(f"spacing must be three positive numbers x,y,z, got '{text}'", "--spacing", "e.g. 0.9375,0.9375,1")
    return vals


app.command("solvers")(__import__("medgen_cli.cli.sweep", fromlist=["solvers"]).solvers)
app.command("optimal-steps")(__import__("medgen_cli.cli.sweep", fromlist=["optimal_steps"]).optimal_steps)
