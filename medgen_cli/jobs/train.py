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
from ..errors import InputError, MedgenError, UsageError
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


def dry_run_record(loaded: Loaded, run_dir: Path, shape: tuple[int, int] | None = None,
                   gpu_mem: int | None = None, cli_args: tuple | None = None) -> tuple[dict, str]:
    """The resolved config, the memory plan and (with ``shape`` = (nodes, GPUs per node)) the launch lines.

    Nothing is written. Without a dataset (--data) the preset is still resolved and planned, the
    dataset is not checked (a warning says so) and the 2D slice dataset's host memory is not counted."""
    from ..data.layout import patients

    p = loaded.preset
    n_patients = None
    if p.data.root:
        root = build.data_root(p)
        n_patients = sum(len(patients(root, split)) for split in (p.data.train_split, p.data.val_split))
    else:
        log.warning("warning: no dataset given (--data): the dataset is not checked")
    n = build.count_parameters(p)
    rec = {"kind": "config", "run_dir": str(run_dir), "parameters": n, "preset": dump(p)}
    nodes, gpus = shape or (1, 1)
    human_tail = []
    if not p.diffrs.enabled:
        rec["memory"] = memory_plan(p, nodes, gpus, gpu_mem, n_patients)
        human_tail.append(f"# {rec['memory']['summary']}")
    else:
        log.warning("warning: the memory planner covers diffusion training, not the DiffRS head: no prediction")
    if shape is not None:
        from . import launch

        preset_ref, sets, flags = cli_args or (p.name, [], {})
        if preset_ref and Path(str(preset_ref)).is_file():  # a user TOML: every node must find it
            preset_ref = str(Path(str(preset_ref)).resolve())
        data = str(Path(p.data.root).expanduser().resolve()) if p.data.root else None
        rec["launch"] = launch.launch_record(nodes, gpus, preset_ref, data, sets, flags,
                                             str(Path(run_dir).resolve()), Path(run_dir).name)
        where = "on every node (MASTER_ADDR = the first node's address)" if nodes > 1 else "on the node"
        human_tail += [f"# torchrun, {where}:", rec["launch"]["torchrun"], "# SLURM batch script (sbatch FILE):",
                       rec["launch"]["sbatch"]]
    return rec, "\n".join([json.dumps(rec, indent=2), *human_tail])


def memory_plan(p, nodes: int, gpus: int, gpu_mem: int | None, n_patients: int | None) -> dict:
    """engine/planner.py's plan for this machine's GPU (or ``gpu_mem`` bytes) and the world shape."""
    from ..engine import planner

    name = None
    if gpu_mem is None:
        gpu_mem, name = planner.gpu_total_memory()
    cuda = gpu_mem is not None or str(p.train.device).startswith(("cuda", "auto"))
    try:
        out = planner.plan(p, world=nodes * gpus, ranks_per_node=gpus, gpu_total=gpu_mem, gpu_name=name,
                           patients=n_patients, cuda=cuda)
    except MedgenError:  # the preset cannot run so (batch split, FSDP in a world of one): refuse it
        raise
    except Exception as e:  # a planner limitation must not take --dry-run's validation down with it
        log.warning(f"warning: no memory prediction ({type(e).__name__}: {e})")
        return {"error": f"{type(e).__name__}: {e}", "summary": "memory: not predicted (planner error)"}
    if gpu_mem is None:
        out["notes"].append("no GPU here: pass --gpu-mem SIZE (e.g. 80GiB) for a verdict")
    out["summary"] = planner.summary(out)
    return out


def run(preset_ref, sets, flags, run_dir, resume, dry_run, nodes=None, gpus_per_node=None, gpu_mem=None):
    from . import launch

    shape = launch.check_shape(nodes, gpus_per_node, dry_run)
    if gpu_mem is not None and not dry_run:
        raise UsageError("--gpu-mem is the memory planner's target GPU: it applies to --dry-run", "--gpu-mem",
                         "add --dry-run (training itself uses the GPU it runs on)")
    from ..engine.planner import parse_size

    mem = parse_size(gpu_mem) if gpu_mem is not None else None
    loaded, run_dir = resolve(preset_ref, sets, flags, Path(run_dir) if run_dir else None, resume)
    if dry_run:
        yield dry_run_record(loaded, run_dir, shape, mem, (preset_ref, sets, flags))
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
    from ..engine.planner import parallel_kind

    parallel_kind(p.train.parallel, world.size, 0)  # train.parallel=fsdp in a world of one: refused before any work
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
    trainer = Trainer(model, build.build_strategy(p), train_ds, val_ds, p.train, run_dir, build.config_json(p),
                      device, num_workers=p.data.workers(device.type == "cuda"), world=world,
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
    net = trainer.eval_model().eval()
    solver = "euler" if getattr(trainer.strategy, "kind", "rflow") != "ddpm" else "ddim"
    # One item at a time (samples do not depend on their batch): four 3D volumes at once in fp32 need more
    # GPU memory than a training step (engine/planner.py, "preview").
    x = torch.cat([generate(net, trainer.strategy, noise[i:i + 1], cond[i:i + 1], solver, 10, space=trainer.space)[0]
                   for i in range(n)])
    mode_seg = cond.shape[1] == 0
    pics = [view(finish(x[i, 0].cpu().numpy(), mode_seg)) for i in range(n)]
    pics += [view(it["image"][0].numpy()) for it in items]
    save_png(trainer.run_dir / "previews" / f"epoch-{epoch:04d}.png", grid(pics, cols=n))
