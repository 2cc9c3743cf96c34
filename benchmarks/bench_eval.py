"""Evaluation speed: slices/s from cold .nii.gz to features (reference build), beside a plain torchvision
ResNet50 loop, each stage alone (reading+inflating, network), and the process wall time of
`medgen eval fid` against a cached reference.

    python benchmarks/bench_eval.py --n-ref 105 --n-gen 25 --size 256 --depth 150 --out bench.json

Random weights of the right shapes are written under a temporary TORCH_HOME (no download). Data are
phantoms written as .nii.gz (float32, nibabel's gzip level): 16 distinct phantoms, the others scaled
copies (distinct bytes). "Cold" means not yet decoded by medgen and no feature cache (the OS page
cache may hold the compressed files, as it would on a re-run). Prints one JSON object.
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
    folders, seed, size, depth = args
    from medgen_cli.data.nifti import write_nifti
    from medgen_cli.data.phantom import synth_patient

    base = synth_patient(seed, size=size, depth=depth)[0]["bravo"]
    for k, folder in enumerate(folders):
        write_nifti(Path(folder) / "bravo.nii.gz", (base * (1 + 0.003 * k)).astype(np.float32),
                    spacing=(240 / size, 240 / size, 1.0))
    return len(folders)


def make_data(root: Path, n_ref: int, n_gen: int, size: int, depth: int, workers: int):
    folders = [str(root / "train" / f"p{i:04d}") for i in range(n_ref)]
    folders += [str(root / "gen" / f"{i:05d}") for i in range(n_gen)]
    groups = [folders[k::workers] for k in range(workers)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_write, [(g, 100 + k, size, depth) for k, g in enumerate(groups) if g]))


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


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
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                m(xi)
            _sync(device)
        out[label] = round(steps * batch / (time.perf_counter() - t), 1)
    return out


def network_only(ext, size, depth, device, reps):
    """The extractor (resize + normalise + network) on slices already on the device."""
    import torch

    x = torch.rand(depth, 1, size, size, device=device)
    ext(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        ext(x)
    _sync(device)
    return round(reps * depth / (time.perf_counter() - t), 1)


def reading_only(files, depth, workers, pin):
    from medgen_cli.jobs import evaluate as job

    t = time.perf_counter()
    n = sum(v.shape[0] for v, _, _ in job._prefetch(lambda p: job._read_volume(p, depth, pin), files, workers))
    return round(n / (time.perf_counter() - t), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ref", type=int, default=105)
    ap.add_argument("--n-gen", type=int, default=25)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=150)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plain-n", type=int, default=4096)
    ap.add_argument("--net-reps", type=int, default=20)
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
    res["make_data_s"] = round(time.perf_counter() - t, 2)

    from medgen_cli.data import layout
    from medgen_cli.jobs import evaluate as job
    from medgen_cli.metrics import features

    files = [p / "bravo.nii.gz" for p in layout.patients(tmp / "data", "train")]
    res["mb_per_file_gz"] = round(sum(f.stat().st_size for f in files) / len(files) / 1e6, 2)
    res["inflate"] = job.inflater()
    workers = min(os.cpu_count() or 1, 16)
    res["plain_resnet50_slices_per_s"] = plain_loop(device, a.plain_n)
    ext = features.load("resnet50-imagenet", device=device)
    res["extractor"] = {"precision": ext.precision, "channels_last": ext.channels_last}
    res["network_only_slices_per_s"] = network_only(ext, a.size, a.depth, device, a.net_reps)
    # the reference build, cold: content hashes + reading + network; then each part alone (warm files)
    timings = {}
    _sync(device)
    t = time.perf_counter()
    f, g, hit = job.reference_features(files, ext, "axial", a.depth, cache=True, timings=timings)
    _sync(device)
    dt = time.perf_counter() - t
    res["reference_build"] = {"slices": int(len(f)), "seconds": round(dt, 3), "slices_per_s": round(len(f) / dt, 1),
                              "extract_seconds": round(timings["seconds"], 3), "cache_hit": bool(hit),
                              "workers": timings["workers"]}
    # correctness of the device path: the same features as nibabel + CPU preprocessing (load_slices)
    import torch as _t

    want = _t.cat([ext(_t.from_numpy(s)[:, None]) for p in files[:2] for s in job.load_slices(str(p), "ref",
                                                                                              "axial", a.depth)])
    n2 = len(want)
    res["reference_build"]["max_abs_diff_vs_nibabel_path"] = float((_t.from_numpy(f[:n2]) - want.cpu()).abs().max())
    res["reference_build"]["feature_scale"] = float(want.abs().mean())
    t = time.perf_counter()
    job._file_identity(files)
    res["reference_build"]["hash_memo_lookup_s"] = round(time.perf_counter() - t, 3)
    res["reading_only_slices_per_s"] = {f"threads_{w}": reading_only(files, a.depth, w, device == "cuda")
                                        for w in sorted({1, workers})}
    real_inflate = job._inflate
    if res["inflate"] == "isal":
        import gzip

        job._inflate = gzip.decompress
        res["reading_only_slices_per_s"][f"threads_{workers}_zlib"] = reading_only(files, a.depth, workers,
                                                                                   device == "cuda")
        job._inflate = real_inflate
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                           os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
    res["python_import_torch_s"] = round(time.perf_counter() - t, 3)
    cmd = [sys.executable, "-m", "medgen_cli", "eval", "fid", "--gen", str(tmp / "data" / "gen"), "--ref", "train",
           "--data", str(tmp / "data"), "--json", "--device", device]
    runs, recs = [], []
    for _ in range(2):
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        runs.append(round(time.perf_counter() - t, 3))
        if p.returncode:
            res["fid_error"] = p.stderr[-2000:]
            break
        recs.append(json.loads(p.stdout.splitlines()[0]))
    res["eval_fid_process_wall_s"] = runs
    if recs:
        res["eval_fid_record"] = {k: recs[-1][k] for k in ("value", "n_gen", "n_ref", "n_gen_slices", "n_ref_slices",
                                                           "ref_cache_hit", "seconds")}
        res["eval_fid_first_seconds"] = recs[0]["seconds"]
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
