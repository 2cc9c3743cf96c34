"""Evaluation speed: slices/s from cold .nii.gz to features (reference build), beside a plain torchvision
ResNet50 loop, each stage alone (reading+inflating, network eager and from a CUDA graph), `medgen eval
fid` run cold (its reference phase builds the reference: slices/s; and its process wall), and its
process wall against a cached reference. Self-checks that the fast path's features equal the plain
path's (nibabel + CPU preprocessing + eager network). `--build-only`: the builds alone (first builds
through the cache path, builds without it at several reader counts, cold `medgen eval fid`).

    python benchmarks/bench_eval.py --out bench.json                       # GPU: 105 ref + 25 gen, 256x256x150
    python benchmarks/bench_eval.py --device cpu --n-ref 4 --n-gen 2 --size 64 --depth 8 --plain-n 32 --net-reps 1

Random weights of the right shapes are written under a temporary TORCH_HOME (no download). Data are
phantoms from medgen's own generator, written as .nii.gz (float32, nibabel's gzip level): 16 distinct
phantoms, the others scaled copies (distinct bytes). "Cold" means not yet decoded by medgen and no
feature cache (the OS page cache may hold the compressed files, as it would on a re-run). Every
section records its error instead of stopping the run; one JSON object is printed at the end
(progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def _log(msg):
    print(f"[bench_eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


OUT: Path | None = None  # --out: rewritten after every section, so a run cut short still leaves its figures


def section(res, name):
    """``section(res, name)(fn, *args)``: run fn, store its result (or its error) under res[name]."""
    def run(fn, *a, **k):
        _log(name)
        t = time.perf_counter()
        try:
            res[name] = fn(*a, **k)
        except Exception as exc:  # keep going: the other figures are still worth having
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        _log(f"{name} done in {time.perf_counter() - t:.1f} s")
        if OUT is not None:
            OUT.write_text(json.dumps(res, indent=1))
        return res[name]
    return run


def plain_loop(device, n=4096, batch=256):
    import torch
    import torchvision

    net = torchvision.models.resnet50(weights=None).eval().to(device)
    net.fc = torch.nn.Identity()
    batch = min(batch, n)
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


def network_only(ext, size, depth, device, reps, graph):
    """The extractor (resize + normalise + network) on slices already on the device, eager or graphed."""
    import torch

    x = torch.rand(depth, 1, size, size, device=device)
    with ext.graphed(graph):
        ext(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            ext(x)
        _sync(device)
        return round(reps * depth / (time.perf_counter() - t), 1)


def reading_only(files, depth, workers, inflate="auto", copy_to=None):
    """Reader processes alone (pool start included): slices/s; with ``copy_to`` also the device copy."""
    import torch

    from medgen_cli.metrics import reader

    t = time.perf_counter()
    n, first = 0, None
    stream = torch.cuda.Stream() if copy_to == "cuda" else None
    with reader.ReaderPool.for_files(files, workers, inflate=inflate) as pool:
        for _, v in reader.open_source(files, depth, workers, pool):
            first = first or time.perf_counter() - t
            n += v.array.shape[0]
            if stream is not None:
                with torch.cuda.stream(stream):
                    torch.from_numpy(v.array).to(copy_to)
            v.release()
        inflater = pool.inflate
    dt = time.perf_counter() - t
    return {"slices_per_s": round(n / dt, 1), "seconds": round(dt, 3), "first_volume_s": round(first, 3),
            "workers": workers, "inflate": inflater}


def build(job, files, ext, depth, device, graph, cache, workers=None):
    """A cold reference build (content hashes when cached, reading, device preprocessing, network)."""
    timings = {}
    _sync(device)
    t = time.perf_counter()
    if cache:
        f, g, hit = job.reference_features(files, ext, "axial", depth, cache=True, timings=timings, graph=graph,
                                           workers=workers)
    else:
        f, g = job.extract(files, ext, "ref", "axial", depth, timings=timings, graph=graph, workers=workers)
        hit = False
    _sync(device)
    dt = time.perf_counter() - t
    timings["extract_seconds"] = timings.pop("seconds", None)  # extract's own part; "seconds" is the whole build
    info = {"slices": int(len(f)), "seconds": round(dt, 3), "slices_per_s": round(len(f) / dt, 1), "cache_hit": hit,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in timings.items()}}
    if cache:  # the entry is written from a thread while `medgen eval` goes on: how long until it is on disk
        job.wait_cache_writes()
        info["seconds_until_cache_written"] = round(time.perf_counter() - t, 3)
    return info, f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ref", type=int, default=105)
    ap.add_argument("--n-gen", type=int, default=25)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=150)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plain-n", type=int, default=4096)
    ap.add_argument("--net-reps", type=int, default=20)
    ap.add_argument("--fid-runs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: medgen's, cores - 1)")
    ap.add_argument("--build-only", action="store_true", help="only the reference builds (cache path, then without)")
    a = ap.parse_args()
    global OUT
    OUT = Path(a.out) if a.out else None
    t_start = time.perf_counter()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["TORCH_HOME"] = str(tmp / "torch")
    os.environ["MEDGEN_CACHE"] = str(tmp / "cache")
    from medgen_cli.data import layout
    from medgen_cli.jobs import evaluate as job
    from medgen_cli.metrics import features, nets, reader

    ck = tmp / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(nets.ResNet50().state_dict(), ck / features.RESNET50_FILE)
    cpus = reader.cpu_count()
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{cpus}",
           "torch": torch.__version__, "python": sys.version.split()[0], "cpus": cpus, "n_ref": a.n_ref,
           "n_gen": a.n_gen, "shape": [a.size, a.size, a.depth], "inflate": reader.inflater()}
    t = time.perf_counter()
    make_data(tmp / "data", a.n_ref, a.n_gen, a.size, a.depth, max(1, min(cpus, 16)))
    res["make_data_s"] = round(time.perf_counter() - t, 2)
    files = [p / "bravo.nii.gz" for p in layout.patients(tmp / "data", "train")]
    res["mb_per_file_gz"] = round(sum(f.stat().st_size for f in files) / len(files) / 1e6, 2)
    workers = reader.default_workers(len(files)) if a.workers is None else a.workers
    res["workers"] = workers

    if not a.build_only:
        section(res, "plain_resnet50_slices_per_s")(plain_loop, device, a.plain_n)
    ext = features.load("resnet50-imagenet", device=device)
    res["extractor"] = {"precision": ext.precision, "channels_last": ext.channels_last}
    if not a.build_only:
        section(res, "network_only_slices_per_s")(lambda: {
        "eager": network_only(ext, a.size, a.depth, device, a.net_reps, False),
        **({"graph": network_only(ext, a.size, a.depth, device, a.net_reps, True)} if device == "cuda" else {})})
    res["graph_info_network_only"] = dict(ext.graph_info)

    # the reference build, cold, the real path (content hashes + reader processes + device + network)
    out = {}

    def main_build():
        info, out["f"] = build(job, files, ext, job.DEPTH, device, None, cache=True,  # the CLI's depth: its cache key
                               workers=workers)
        return info

    ext._graphs.clear()  # the build captures its own graph, as a fresh `medgen eval` process would
    section(res, "reference_build")(main_build)
    res["graph_info"] = dict(ext.graph_info)

    def self_check():
        """The fast path's features equal nibabel + CPU preprocessing + the eager network (2 volumes)."""
        f = out["f"]
        want = torch.cat([ext(torch.from_numpy(s)[:, None]) for p in files[:2]
                          for s in job.load_slices(str(p), "ref", "axial", a.depth)]).cpu()
        d = float((torch.from_numpy(f[:len(want)]) - want).abs().max())
        scale = float(want.abs().max())
        return {"max_abs_diff": d, "feature_max_abs": scale, "ok": d <= 1e-3 * (1 + scale)}

    # `medgen eval fid` in fresh processes: cold (its own empty cache: the reference is built inside the
    # command, as a first `medgen eval fid --ref train` does), then against the reference cached above
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def wall_env(cmd, **extra):
        t = time.perf_counter()
        p = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        return round(time.perf_counter() - t, 3), p

    cmd = [sys.executable, "-m", "medgen_cli", "eval", "fid", "--gen", str(tmp / "data" / "gen"), "--ref", "train",
           "--data", str(tmp / "data"), "--json", "--device", device]

    def cold_cli():
        shutil.rmtree(tmp / "cache-cold", ignore_errors=True)
        s, p = wall_env(cmd, MEDGEN_CACHE=str(tmp / "cache-cold"))
        if p.returncode:
            return {"error": p.stderr[-3000:]}
        rec = json.loads(p.stdout.splitlines()[0])
        sec = rec["seconds"]
        return {"process_wall_s": s, "seconds": sec, "ref_cache_hit": rec["ref_cache_hit"],
                "n_ref_slices": rec["n_ref_slices"],
                "reference_slices_per_s": round(rec["n_ref_slices"] / sec["reference"], 1)}

    def cli():
        r = {"python_import_torch_s": wall_env([sys.executable, "-c", "import torch"])[0],
             "python_import_cli_s": wall_env([sys.executable, "-c", "import medgen_cli.cli.app"])[0]}
        runs = []
        for _ in range(a.fid_runs):
            s, p = wall_env(cmd)
            if p.returncode:
                r["error"] = p.stderr[-3000:]
                break
            rec = json.loads(p.stdout.splitlines()[0])
            runs.append({"process_wall_s": s, "seconds": rec["seconds"], "ref_cache_hit": rec["ref_cache_hit"],
                         "value": rec["value"], "n_gen_slices": rec["n_gen_slices"]})
        r["runs"] = runs
        r["process_wall_s"] = [x["process_wall_s"] for x in runs]
        return r

    if a.build_only:
        def first_build():
            """A first build through the cache path again: no memo, no entry, no graph captured."""
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            ext._graphs.clear()
            return build(job, files, ext, job.DEPTH, device, None, cache=True, workers=workers)[0]

        for rep in (1, 2):
            section(res, f"first_build_{rep}")(first_build)
        for w in (workers, 8, 12):
            section(res, f"reference_build_graph_no_cache_{w}_readers")(
                lambda w=w: build(job, files, ext, a.depth, device, True, cache=False, workers=w)[0])
        for rep in (1, 2):
            section(res, f"eval_fid_cold_{rep}")(cold_cli)
        return finish(res, t_start)
    if "f" in out:
        section(res, "equal_to_plain_path")(self_check)
    if device == "cuda":  # attribute the gain: the same build eagerly, and graphed again (no hashing)
        def variant(graph):
            info, f = build(job, files, ext, a.depth, device, graph, cache=False)
            if "f" in out:
                info["max_abs_diff_vs_main_build"] = float(np.abs(f - out["f"]).max())
            return info

        section(res, "reference_build_eager_no_cache")(variant, False)
        section(res, "reference_build_graph_no_cache")(variant, True)
    t = time.perf_counter()
    job._file_identity(files)
    res["hash_memo_lookup_s"] = round(time.perf_counter() - t, 3)
    section(res, "reading_only")(lambda: {
        "processes": reading_only(files, a.depth, workers),
        **({"processes_zlib": reading_only(files, a.depth, workers, "zlib")} if res["inflate"] == "isal" else {}),
        **({"processes_plus_device_copy": reading_only(files, a.depth, workers, copy_to="cuda")}
           if device == "cuda" else {})})

    for rep in (1, 2):
        section(res, f"eval_fid_cold_{rep}")(cold_cli)
    section(res, "eval_fid")(cli)
    finish(res, t_start)


def finish(res, t_start):
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if OUT:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
