"""`medgen train`: resolve the preset, prepare the run folder, build the parts, run the loop.

Yields (record, human line) pairs for the CLI to print: the resolved config on --dry-run, the
final checkpoint record otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path

from .. import __version__, records
from ..config import Loaded, dump, load
from ..errors import InputError, UsageError
from . import build

log = logging.getLogger("medgen")


def resolve(preset_ref: str | None, sets: list[str], flags: dict, run_dir: Path | None,
            resume: bool) -> tuple[Loaded, Path]:
    """The validated preset and the run folder; refuses to overwrite a run without --resume."""
    if resume:
        if run_dir is None:
            raise UsageError("--resume needs --run-dir", "--resume", "name the run: --resume --run-dir DIR")
        cfg_file = run_dir / "config.json"
        if not cfg_file.is_file():
            raise InputError(f"not a medgen run (no config.json): {run_dir}", "--run-dir",
                             "start a new run without --resume")
        base = json.loads(cfg_file.read_text())["preset"]
        return load(None, sets, flags, base=base), run_dir
    if preset_ref is None:
        raise UsageError("no preset given", "--preset", "e.g. medgen train --preset 2d-pixel-128 --data DIR")
    if run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("data-parallel training needs --run-dir (every process must name the same run)",
                         "--run-dir", "add --run-dir runs/NAME to the torchrun command")
    loaded = load(preset_ref, sets, flags)
    if run_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{loaded.preset.name}-{stamp}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"run folder exists: {run_dir}", "--run-dir",
                         "add --resume to continue it, or choose another --run-dir")
    return loaded, run_dir


def provenance(loaded: Loaded) -> dict:
    import monai
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"files": loaded.files, "sets": loaded.sets, "medgen_version": __version__, "git_sha": sha,
            "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
            "host": socket.gethostname(), "created": dt.datetime.now().isoformat(timespec="seconds")}


def dry_run_record(loaded: Loaded, run_dir: Path) -> tuple[dict, str]:
    root = build.data_root(loaded.preset)
    from ..data.layout import patients

    for split in (loaded.preset.data.train_split, loaded.preset.data.val_split):
        patients(root, split)
    n = build.count_parameters(loaded.preset)
    rec = {"kind": "config", "run_dir": str(run_dir), "parameters": n, "preset": dump(loaded.preset)}
    return rec, json.dumps(rec, indent=2)


def run(preset_ref, sets, flags, run_dir, resume, dry_run):
    loaded, run_dir = resolve(preset_ref, sets, flags, Path(run_dir) if run_dir else None, resume)
    if dry_run:
        yield dry_run_record(loaded, run_dir)
        return
    step_dir = train(loaded, run_dir, resume)
    if step_dir is None:  # a data-parallel rank other than 0: rank 0 reports
        return
    p = loaded.preset
    import json as _json

    st = _json.loads((step_dir / "trainer_state.json").read_text())
    rec = records.make("checkpoint", path=str(step_dir), run=str(run_dir), step=st["step"],
                       epoch=st["epoch"], weights="ema" if p.train.ema.enabled else "raw", preset=p.name)
    yield rec, str(step_dir)


def train(loaded: Loaded, run_dir: Path, resume: bool) -> Path | None:
    """Train (or continue) the run; returns the last checkpoint's step folder (None on ranks > 0).

    Under torchrun every process runs this; rank 0 writes the run folder, logs and checkpoints."""
    from .. import checkpoint as ckpt
    from ..engine.logbook import write_json_atomic, write_status
    from ..engine.trainer import Trainer
    from ..runtime import StopSignals, barrier, init_world

    p = loaded.preset
    root = build.data_root(p).resolve()
    p.data.root = str(root)  # absolute in config.json and checkpoints: later stages run from anywhere
    check_data(p, root)
    if p.diffrs.enabled:  # DiffRS: train the discriminator head on the frozen model
        from ..engine.diffrs import train_head

        return train_head(loaded, run_dir, resume, root, provenance(loaded))
    world, device = init_world(p.train.device)
    train_ds = build.build_dataset(p, p.data.train_split, root, train=True)
    val_ds = build.build_dataset(p, p.data.val_split, root)
    space = build.build_space(p, train_ds)  # spaces.py; may estimate space.stats into p before config.json
    model = build.build_model(p)
    if p.controlnet.stage == 2 and not resume:  # controlnet: start from the stage-1 UNet
        build.load_stage1(p, model)  # writes the pointer (path + sha256) into p before config.json
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json_atomic(run_dir / "config.json", {"preset": dump(p), "provenance": provenance(loaded)})
    barrier(world)
    trainer = Trainer(model, build.build_strategy(p), train_ds, val_ds, p.train, run_dir,
                      build.config_json(p), device, num_workers=p.data.num_workers, world=world,
                      min_snr_unsquared=p.compat.min_snr_rflow_unsquared, space=space)
    if resume:
        trainer.resume(ckpt.resolve_step_dir(run_dir, "latest"))
        log.info(f"resuming {run_dir} at step {trainer.state.step} (epoch {trainer.state.epoch})")
    log.info(f"training {p.name}: {len(train_ds)} training items, {trainer.steps_per_epoch} steps/epoch, "
             f"device {device}, run {run_dir}")
    try:
        with StopSignals() as stop:
            trainer.fit(stop, preview=_preview)
    except BaseException as e:
        from ..errors import Interrupted

        if world.main and not isinstance(e, Interrupted):
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    barrier(world)  # rank 0 has written the last checkpoint
    return ckpt.resolve_step_dir(run_dir, "latest") if world.main else None


def check_data(p, root: Path) -> None:
    """Refuse a dataset with problems before any work: every problem listed at once."""
    from ..data.layout import check_dataset

    mods = list(p.modalities())
    problems = [x for x in check_dataset(root, mods, [p.data.train_split, p.data.val_split])
                if x.severity == "error"]
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(f"{first.what}{more}", first.path,
                         first.hint or f"see `medgen data check {root}`",
                         details=[str(x) for x in problems[1:10]])


def _preview(trainer, epoch: int) -> None:
    """A grid of a few Euler samples conditioned on the first validation items."""
    import torch

    from ..engine.sampling import generate
    from ..previews import grid, save_png, view
    from ..runtime import randn_keyed
    from .sample import finish

    n = min(4, len(trainer.val_ds))
    picks = [round(k * (len(trainer.val_ds) - 1) / max(n - 1, 1)) for k in range(n)]  # spread over the split
    items = [trainer.val_ds[i] for i in picks]
    cond = torch.stack([it["cond"] for it in items]).to(trainer.device)
    shape = tuple(items[0]["image"].shape)
    shape = trainer.space.shape(shape) if trainer.space is not None else shape  # noise in the model's space
    noise = randn_keyed(shape, [(trainer.cfg.seed, 6, i) for i in range(n)], trainer.device)
    x, _ = generate(trainer.eval_model().eval(), trainer.strategy, noise, cond, "euler" if
                    getattr(trainer.strategy, "kind", "rflow") != "ddpm" else "ddim", 10, space=trainer.space)
    mode_seg = cond.shape[1] == 0
    pics = [view(finish(x[i, 0].cpu().numpy(), mode_seg)) for i in range(n)]
    pics += [view(it["image"][0].numpy()) for it in items]
    save_png(trainer.run_dir / "previews" / f"epoch-{epoch:04d}.png", grid(pics, cols=n))
