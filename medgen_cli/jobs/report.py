"""`medgen report`: a Markdown table of runs. Reads JSON files only (no torch).

State comes from status.json; a run that says "running" but whose process is gone (same host) or
whose heartbeat is older than STALE_S is shown as "killed".
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from ..errors import InputError

STALE_S = 30 * 60


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        if (p / "config.json").is_file():
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(c for c in p.rglob("config.json") if c.parent.name != "ckpt"))
        else:
            raise InputError(f"not a run folder: {p}", "RUNS", "give folders made by `medgen train`")
    runs = [r.parent if r.name == "config.json" else r for r in runs]
    if not runs:
        raise InputError("no runs found", ", ".join(map(str, paths)), "give folders made by `medgen train`")
    return runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_of(run: Path) -> str:
    f = run / "status.json"
    if not f.is_file():
        return "unknown"
    st = json.loads(f.read_text())
    if st.get("state") != "running":
        return st.get("state", "unknown")
    same_host = st.get("host") == socket.gethostname()
    if (same_host and not _alive(int(st.get("pid", -1)))) or time.time() - st.get("heartbeat", 0) > STALE_S:
        return "killed"
    return "running"


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    log = _jsonl(run / "metrics.jsonl")
    vals = [r["val_loss"] for r in log if r.get("kind") == "val"]
    last = log[-1] if log else {}
    metrics = {}
    for rec in _jsonl(run / "eval.jsonl"):  # the latest value of each metric
        metrics[rec["name"]] = rec["value"]
    return {"run": str(run), "preset": cfg["preset"].get("name", ""), "state": state_of(run),
            "epoch": last.get("epoch"), "step": last.get("step"),
            "best_val_loss": min(vals) if vals else None, "metrics": metrics}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def render(paths: list[Path], as_json: bool = False) -> str:
    rows = [summary(r) for r in find_runs([Path(p) for p in paths])]
    if as_json:
        return "".join(json.dumps(r) + "\n" for r in rows)
    names = sorted({k for r in rows for k in r["metrics"]})
    head = ["run", "preset", "state", "epoch", "step", "best val loss", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["preset"], r["state"], _fmt(r["epoch"]), _fmt(r["step"]), _fmt(r["best_val_loss"]),
                 *(_fmt(r["metrics"].get(n)) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
