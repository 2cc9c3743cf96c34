"""A run's log: metrics.jsonl, TensorBoard events under tb/, and the status.json heartbeat."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("medgen")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Logbook:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled  # only rank 0 of a data-parallel job writes
        self._tb = None

    def _writer(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl is written)")
                self._tb = False
        return self._tb

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        rec = {**rec, "time": time.time()}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        tb = self._writer()
        prefix = "train" if rec.get("kind") == "train" else "val"
        for k, v in rec.items():
            if tb and isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                tb.add_scalar(f"{prefix}/{k}", v, rec["step"])
        if tb:
            tb.flush()
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in rec.items() if k not in ("time", "kind"))
        log.info(f"[{rec.get('kind', 'log')}] {shown}")

    def status(self, state: str, st=None) -> None:
        if self.enabled:
            write_status(self.run_dir, state, step=getattr(st, "step", None), epoch=getattr(st, "epoch", None))


def write_status(run_dir: Path, state: str, **extra) -> None:
    write_json_atomic(Path(run_dir) / "status.json", {
        "state": state, "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(), **extra})
