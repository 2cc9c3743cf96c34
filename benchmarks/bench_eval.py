"""Evaluation speed: slices/s from cold .nii.gz to features, beside a plain torchvision ResNet50 loop,
and the wall time of `medgen eval fid` against a cached reference.

    python benchmarks/bench_eval.py --n-ref 105 --n-gen 25 --size 256 --depth 150 --out bench.json

Random weights of the right shapes are written under a temporary TORCH_HOME (no download); data are
phantoms written as .nii.gz (float32, gzip) in parallel. "Cold" means not yet decoded by medgen
(the OS page cache may hold the compressed files). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _write(args):
    folder, seed, size, depth = args
    from medgen_cli.data.nifti import write_nifti
    from medgen_cli.data.phantom import synth_patient

    imgs = synth_patient(seed, size=size, depth=depth)[0]
    write_nifti(Path(folder) / "bravo.nii.gz", imgs["bravo"], spacing=(240 / size, 240 / size, 1.0))
    return folder


def make_data(root: Path, n_ref: int, n_gen: int, size: int, depth: int, workers: int):
    jobs = [(str(root / "train" / f"p{i:04d}"), i, size, depth) for i in range(n_ref)]
    jobs += [(str(root / "gen" / f"{i:05d}"), 10_000 + i, size, depth) for i in range(n_gen)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write, jobs))


def plain_loop(device, n=4096, batch=256):
    import torch
    import torchvision

    net = torchvision.models.resnet50(weights=None).eval().to(device)
    net.fc = torch.nn.Identity()
    x = torch.rand(batch, 3, 224, 224, device=device)
    out = {}
    for label, dtype, cl in (("fp32", None, False), ("bf16", torch.bfloat16, False), ("bf16_cl", torch.bfloat16, True)):
        if device == "cpu" and label != "fp32":
            continue
        m = net.to(memory_format=torch.channels_last) if cl else net
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        steps = max(1, n // batch)
        with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            m(xi)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                m(xi)
            if device == "cuda":
                torch.cuda.synchronize()
        out[label] = steps * batch / (time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ref", type=int, default=105)
    ap.add_argument("--n-gen", type=int, default=25)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=150)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plain-n", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    import torchvision

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["TORCH_HOME"] = str(tmp / "torch")
    os.environ["MEDGEN_CACHE"] = str(tmp / "cache")
    ck = tmp / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), ck / "resnet50-0676ba61.pth")
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}",
           "torch": torch.__version__, "n_ref": a.n_ref, "n_gen": a.n_gen, "shape": [a.size, a.size, a.depth]}
    t = time.perf_counter()
    make_data(tmp / "data", a.n_ref, a.n_gen, a.size, a.depth, min(os.cpu_count() or 1, 16))
    res["make_data_s"] = time.perf_counter() - t
    res["plain_resnet50_slices_per_s"] = plain_loop(device, a.plain_n)

    from medgen_cli.data import layout
    from medgen_cli.jobs import evaluate as job
    from medgen_cli.metrics import features

    ext = features.load("resnet50-imagenet", device=device)
    files = [p / "bravo.nii.gz" for p in layout.patients(tmp / "data", "train")]
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    f, g, hit = job.reference_features(files, ext, "axial", 150, cache=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res["reference_build"] = {"slices": int(len(f)), "seconds": dt, "slices_per_s": len(f) / dt,
                              "precision": ext.precision, "cache_hit": bool(hit)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "medgen_cli", "eval", "fid", "--gen", str(tmp / "data" / "gen"), "--ref", "train",
           "--data", str(tmp / "data"), "--json", "--device", device]
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        runs.append(time.perf_counter() - t)
        if p.returncode:
            res["fid_error"] = p.stderr[-2000:]
            break
        rec = json.loads(p.stdout.splitlines()[0])
    res["eval_fid_process_wall_s"] = runs
    if "fid_error" not in res:
        res["eval_fid_record"] = {k: rec[k] for k in ("value", "n_gen", "n_ref", "n_gen_slices", "n_ref_slices",
                                                      "ref_cache_hit")}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
