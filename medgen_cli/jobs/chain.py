"""`medgen chain`: a preset's [chain] stages as one resumable pipeline in one folder.

    DIR/data/            synth: the phantom dataset (skipped when --data is given)
    DIR/run/             train: the training run (resumed if a previous chain was interrupted)
    DIR/samples/         sample
    DIR/run/eval.jsonl   eval: one-step x0 metrics on the eval split
    DIR/report.md        report
    DIR/chain.json       the stages done so far

Running the same command again continues where it stopped; finished stages are not redone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import load
from ..engine.logbook import write_json_atomic
from ..errors import ConfigError, UsageError

log = logging.getLogger("medgen")


def _done(dir_: Path) -> list[str]:
    f = dir_ / "chain.json"
    return json.loads(f.read_text())["done"] if f.is_file() else []


def _mark(dir_: Path, stage: str) -> None:
    write_json_atomic(dir_ / "chain.json", {"done": [*_done(dir_), stage]})


def run(preset_ref, sets, flags, dir_, dry_run):
    if preset_ref is None:
        raise UsageError("no preset given", "--preset", "e.g. medgen chain --preset demo")
    given_data = flags.get("data.root")
    loaded = load(preset_ref, sets, flags)
    p = loaded.preset
    if not p.chain.stages:
        raise ConfigError(f"preset '{p.name}' has no [chain] stages", "chain.stages",
                          'set e.g. chain.stages = ["train", "sample", "eval", "report"]')
    dir_ = Path(dir_ or Path("runs") / f"{p.name}-chain")
    stages = [s for s in p.chain.stages if not (s == "synth" and given_data)]
    if dry_run:
        yield {"kind": "config", "dir": str(dir_), "stages": stages, "preset": p.model_dump(mode="json")}, \
            f"{dir_}: {' -> '.join(stages)}"
        return
    dir_.mkdir(parents=True, exist_ok=True)
    if "synth" in stages or not given_data:
        sets = [*sets, f"data.root={json.dumps(str((dir_ / 'data').resolve()))}"]
    for stage in stages:
        if stage in _done(dir_):
            log.info(f"[chain] {stage}: already done")
            continue
        log.info(f"[chain] {stage}")
        yield from STAGES[stage](preset_ref, sets, flags, dir_, loaded)
        _mark(dir_, stage)
    if "report" in _done(dir_) and "report" in stages:
        yield {"kind": "report", "path": str(dir_ / "report.md")}, (dir_ / "report.md").read_text()


def _synth(preset_ref, sets, flags, dir_, loaded):
    from . import data as data_job

    s = loaded.preset.chain.synth
    data_job.synth(dir_ / "data", s.n_train, s.n_val, s.n_test, s.size, s.depth, s.seed, overwrite=True)
    return iter(())


def _train(preset_ref, sets, flags, dir_, loaded):
    from . import train as train_job

    run_dir = dir_ / "run"
    resume = (run_dir / "config.json").is_file()
    lo, run_dir = train_job.resolve(None if resume else preset_ref, sets, flags, run_dir, resume)
    if resume and _has_checkpoint(run_dir):
        train_job.train(lo, run_dir, resume=True)
    else:
        train_job.train(lo, run_dir, resume=False)
    return iter(())


def _has_checkpoint(run_dir: Path) -> bool:
    from .. import checkpoint as ckpt
    from ..errors import InputError

    try:
        ckpt.resolve_step_dir(run_dir, "latest")
        return True
    except InputError:
        return False


def _sample(preset_ref, sets, flags, dir_, loaded):
    import shutil

    from . import sample as sample_job

    out = dir_ / "samples"
    if out.exists():  # a half-written sample folder from an interrupted chain
        shutil.rmtree(out)
    list(sample_job.run(str(dir_ / "run"), out, {}, None, flags.get("train.device"), False))
    return iter(())


def _eval(preset_ref, sets, flags, dir_, loaded):
    from . import evaluate

    recs = []
    for name in loaded.preset.eval.metrics:
        recs += evaluate.run(name, run=dir_ / "run", max_items=loaded.preset.eval.max_items,
                             device=flags.get("train.device"))
    return iter(recs)


def _report(preset_ref, sets, flags, dir_, loaded):
    from . import report

    (dir_ / "report.md").write_text(f"# medgen chain: {loaded.preset.name}\n\n" + report.render([dir_ / "run"]))
    return iter(())


STAGES = {"synth": _synth, "train": _train, "sample": _sample, "eval": _eval, "report": _report}
