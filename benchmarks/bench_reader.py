"""Where a reader process's time goes: read, hash, inflate and the copy into shared memory, per file, with
1 to N processes working at once (standard library + python-isal only, like the reader workers).

    python benchmarks/bench_reader.py DIR_OR_FILES... [--procs 1,8,15] [--out stages.json]

Prints one JSON object: for each process count, files/s and slices/s over all processes, and each
stage's mean milliseconds per file. Compare the stage times at 1 and at N processes: a stage that
slows with N is bound by something shared (memory bandwidth, sibling hyper-threads), not by its code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medgen_cli.metrics import reader  # noqa: E402


def _inflate_sized(raw: bytes, size: int, how: str) -> bytes:
    """One gzip member inflated into a buffer of its known size (the trailer's ISIZE)."""
    if how == "isal":
        from isal import isal_zlib as z
    else:
        import zlib as z
    return z.decompress(raw, wbits=31, bufsize=max(size, 1))


def _work(args):
    files, how, fd, slot = args
    mm = mmap.mmap(fd, slot)
    st = {k: 0.0 for k in ("read", "hash", "inflate", "inflate_sized", "parse", "copy_to_shm")}
    slices = 0
    t_all = time.perf_counter()
    for f in files:
        t = time.perf_counter()
        raw = Path(f).read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(raw).digest()
        t2 = time.perf_counter()
        buf = reader.inflate(raw, how)
        t3 = time.perf_counter()
        size = int.from_bytes(raw[-4:], "little")
        sized = _inflate_sized(raw, size, how)
        t4 = time.perf_counter()
        assert len(sized) == len(buf)
        del sized
        lay = reader.nifti1_layout(buf)
        h, w, d = lay["shape"][:3]
        n = h * w * d * int(lay["dtype"][2:])
        data = memoryview(buf)[lay["offset"]:lay["offset"] + n]
        t5 = time.perf_counter()
        mm[:n] = data
        t6 = time.perf_counter()
        slices += d
        for k, a, b in (("read", t, t1), ("hash", t1, t2), ("inflate", t2, t3), ("inflate_sized", t3, t4),
                        ("parse", t4, t5), ("copy_to_shm", t5, t6)):
            st[k] += b - a
    return st, len(files), slices, time.perf_counter() - t_all


def run(files, procs: int, how: str) -> dict:
    slot = max(reader.uncompressed_size(f) for f in files)
    fds = []
    for _ in range(procs):
        fd = os.memfd_create("bench-reader")
        os.ftruncate(fd, slot)
        fds.append(fd)
    shares = [(files[i::procs], how, fds[i], slot) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        t = time.perf_counter()
        out = pool.map(_work, shares)
        wall = time.perf_counter() - t
    for fd in fds:
        os.close(fd)
    n = sum(o[1] for o in out)
    stages = {k: round(1e3 * sum(o[0][k] for o in out) / n, 2) for k in out[0][0]}
    return {"procs": procs, "files": n, "wall_s": round(wall, 3), "files_per_s": round(n / wall, 1),
            "slices_per_s": round(sum(o[2] for o in out) / wall, 1), "ms_per_file": stages,
            "note": "each file is inflated twice (plain and sized); files_per_s counts both"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--procs", default="1,8,15")
    ap.add_argument("--inflate", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    files = []
    for x in a.inputs:
        p = Path(x)
        files += sorted(p.rglob("*.nii.gz")) if p.is_dir() else [p]
    how = reader.inflater(a.inflate)
    res = {"cpus": os.cpu_count(), "machine": platform.machine(), "inflate": how, "files": len(files)}
    try:
        res["lscpu"] = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in
                        os.popen("lscpu").read().splitlines() if ":" in ln)
                        if k.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                                         "L3 cache")}
    except Exception:
        pass
    res["runs"] = []
    for p in (int(s) for s in a.procs.split(",")):
        res["runs"].append(run(files, p, how))
        print(json.dumps(res["runs"][-1]), file=sys.stderr, flush=True)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
