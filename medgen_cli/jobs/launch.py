"""Launch lines for data-parallel training on several GPUs and nodes (printed by `medgen train --dry-run
--nodes N --gpus-per-node G`). Plain text, no torch: tested as text (there is no cluster here).

Two ways, same run:

- ``torchrun`` on every node, the c10d rendezvous at ``$MASTER_ADDR:$MASTER_PORT`` (the first node);
  one node is ``torchrun --standalone``.
- A SLURM batch script: ``srun`` starts one task per GPU and each task maps SLURM's numbering to the
  RANK / LOCAL_RANK / WORLD_SIZE that ``runtime.init_world`` reads, with MASTER_ADDR = the first node
  of the allocation. No torchrun agent sits between SLURM and medgen, so ``--signal=USR1@…`` reaches
  every rank, which saves at the same step and exits 130; the script adds ``--resume`` when the run
  folder already holds a run, so a resubmitted (or requeued) job continues it.
"""

from __future__ import annotations

import shlex

from ..errors import UsageError

DEFAULT_PORT = 29500


def check_shape(nodes: int | None, gpus_per_node: int | None, dry_run: bool) -> tuple[int, int] | None:
    """(nodes, gpus per node) when launch lines were asked for, else None; bad values are usage errors."""
    if nodes is None and gpus_per_node is None:
        return None
    if not dry_run:
        raise UsageError("--nodes and --gpus-per-node shape the launch lines that --dry-run prints",
                         "--nodes" if nodes is not None else "--gpus-per-node",
                         "add --dry-run, then run the printed torchrun or sbatch command")
    for name, v in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}", name, f"e.g. {name} 2")
    return int(nodes or 1), int(gpus_per_node or 1)


def train_args(preset_ref: str | None, data_root: str | None, sets: list[str], flags: dict,
               run_dir: str) -> list[str]:
    """The `medgen train` arguments every rank runs (the run folder named: ranks must agree on it)."""
    args = ["train"]
    if preset_ref:
        args += ["--preset", str(preset_ref)]
    if data_root:
        args += ["--data", str(data_root)]
    for s in sets:
        args += ["--set", s]
    for flag, key in (("--max-steps", "train.max_steps"), ("--epochs", "train.epochs"),
                      ("--device", "train.device")):
        if flags.get(key) is not None:
            args += [flag, str(flags[key])]
    return args + ["--run-dir", str(run_dir)]


def _cmd(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def torchrun_line(nodes: int, gpus: int, args: list[str], rdzv_id: str = "medgen") -> str:
    """One torchrun command; with several nodes, run it on each (MASTER_ADDR = the first node)."""
    if nodes == 1:
        head = f"torchrun --standalone --nnodes 1 --nproc-per-node {gpus}"
    else:
        head = (f"torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d "
                f'--rdzv-endpoint "$MASTER_ADDR:${{MASTER_PORT:-{DEFAULT_PORT}}}" --rdzv-id {shlex.quote(rdzv_id)}')
    return f"{head} -m medgen_cli {_cmd(args)}"


def sbatch_script(nodes: int, gpus: int, args: list[str], run_dir: str, job_name: str,
                  signal_seconds: int = 300) -> str:
    """A SLURM batch script: one task per GPU started by srun (see the module docstring)."""
    inner = (f'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS '
             f'exec python -m medgen_cli {_cmd(args)} $RESUME')
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus}",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --signal=USR1@{signal_seconds}",
        "# medgen saves and exits 130 on SIGUSR1; resubmit this script to continue the run",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=${{MASTER_PORT:-{DEFAULT_PORT}}}",
        f"RESUME=$([ -f {shlex.quote(str(run_dir) + '/config.json')} ] && echo --resume)",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
    ]
    return "\n".join(lines)


def launch_record(nodes: int, gpus: int, preset_ref, data_root, sets, flags, run_dir: str, name: str) -> dict:
    """The launch lines as a record's fields: ``torchrun`` (one line) and ``sbatch`` (a script)."""
    args = train_args(preset_ref, data_root, sets, flags, run_dir)
    rdzv = "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "medgen"
    return {"nodes": nodes, "gpus_per_node": gpus, "world": nodes * gpus,
            "torchrun": torchrun_line(nodes, gpus, args, rdzv),
            "sbatch": sbatch_script(nodes, gpus, args, run_dir, f"medgen-{rdzv}")}
