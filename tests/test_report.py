"""`medgen report`: states from status.json, including a dead 'running' run shown as killed."""

from __future__ import annotations

import json
import socket
import time


def _run(tmp_path, name, status, metrics=(), evals=()):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": {"name": "demo"}}))
    (run / "status.json").write_text(json.dumps(status))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return run


def test_report_states_and_metrics(cli, tmp_path):
    host, now = socket.gethostname(), time.time()
    _run(tmp_path, "a", {"state": "done", "pid": 1, "host": host, "heartbeat": now},
         [{"kind": "val", "step": 5, "epoch": 1, "val_loss": 0.5}, {"kind": "val", "step": 9, "epoch": 2,
                                                                     "val_loss": 0.25}],
         [{"name": "psnr", "value": 20.0}, {"name": "psnr", "value": 21.5}])
    _run(tmp_path, "b", {"state": "running", "pid": 2 ** 22 + 12345, "host": host, "heartbeat": now})
    _run(tmp_path, "c", {"state": "running", "pid": 1, "host": "elsewhere", "heartbeat": now - 7200})
    _run(tmp_path, "d", {"state": "interrupted", "pid": 1, "host": host, "heartbeat": now})
    r = cli("report", tmp_path)
    assert r.code == 0, r.err
    rows = {line.split("|")[1].strip().split("/")[-1]: line for line in r.out.splitlines()[2:]}
    assert "| done | 2 | 9 | 0.25 | 21.5 |" in rows["a"]
    assert "| killed |" in rows["b"] and "| killed |" in rows["c"] and "| interrupted |" in rows["d"]


def test_report_of_nothing_is_an_input_error(cli, tmp_path):
    r = cli("report", tmp_path / "missing")
    assert r.code == 4 and r.err.startswith("error: ")
