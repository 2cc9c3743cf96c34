"""Volumes for feature extraction: NIfTI-1 read and inflated in worker processes, without torch,
nibabel or even numpy on the workers' side.

Why processes: reader *threads* and the thread that launches the network's kernels share the GIL,
and torch releases and re-takes it around every operator, so the launching thread waited behind the
readers' Python work (on a 16-core H200 host: reading alone 17.6k slices/s, the network alone
13.8k, both together 4.6k). Here each worker is a small Python process (started with ``python -c``,
so it never re-imports the caller's main module; it imports this module, the standard library and,
when installed, python-isal — about 0.05 s) that reads a file, inflates it (isal's igzip, else zlib),
parses the 348-byte NIfTI-1 header (``nifti1_layout``) and copies the voxel bytes — the stored type,
made native byte order — into a slot of one shared memory file (``memfd``). A single-file NIfTI-1
stores ``(H, W, D)`` in Fortran order, which is ``(D, W, H)`` in C order, so the first ``depth``
slices are a prefix of the bytes: no transpose, no numpy. The caller gets a numpy view ``(S, W, H)``
of the slot, copies it where it needs it and releases the slot, which the pool hands to the next
file. Results arrive in completion order (``take``); every file carries a key, so callers reorder.
A file the fast reader does not take (a pair file, an unusual type or header, truncated, not NIfTI)
comes back with ``array=None``; the caller reads it with nibabel, which also reports errors properly.

Slots are as large as the largest inflated file of the pool (``uncompressed_size``). Where
``os.memfd_create`` is missing (not Linux) ``open_source`` reads in threads instead.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import selectors
import struct
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

HAVE_MEMFD = hasattr(os, "memfd_create") and sys.platform.startswith("linux")
MAX_POOL_BYTES = 8 << 30  # slots × slot size never above this (nor above a quarter of the RAM)
_ALIGN = 1 << 16
# NIfTI-1 datatype codes → (numpy kind+size, array-module code of that size for byte swapping);
# RGB, complex, binary, uint64 and float128 are left to nibabel
NIFTI1_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8"}
_SWAP_CODE = {2: "H", 4: "I", 8: "Q"}
NIFTI1_SINGLE_MIN_OFFSET = 352
_NATIVE = "<" if sys.byteorder == "little" else ">"


class DigestTask:
    """Marks the keys of ``ReaderPool.digests``' tasks (no caller's key equals one)."""


@dataclass
class Volume:
    """One file's voxels ``(S, W, H)`` in the stored type, native byte order (``array``, numpy), or
    ``array=None``: read it with nibabel instead (``reason`` says why). ``release()`` returns the
    slot (call it once the array has been copied)."""

    key: object
    path: Path
    array: object  # numpy.ndarray | None
    slope: float | None
    inter: float | None
    reason: str = ""
    _release: Callable | None = None

    def release(self) -> None:
        if self._release is not None:
            self.array = None
            fn, self._release = self._release, None
            fn()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(n_files: int) -> int:
    """One worker per core but one (the caller's own thread needs a core), at most 16."""
    return max(1, min(n_files, cpu_count() - 1, 16))


# ---- the raw NIfTI-1 reader (standard library only) ------------------------------------------------
def inflater(prefer: str = "auto") -> str:
    """"isal" when python-isal is importable (and ``prefer`` is not "zlib"), else "zlib"."""
    if prefer != "zlib":
        try:
            import isal.igzip  # noqa: F401

            return "isal"
        except ImportError:
            pass
    return "zlib"


def inflate(raw: bytes, how: str = "auto") -> bytes:
    """Decompress gzip bytes with isal or zlib (``how``: auto | isal | zlib).

    The first member is inflated into one buffer of the size the gzip trailer gives (a quarter less
    time than letting the output grow); when that is not the whole file (several members, or a trailer
    that does not match) every member is inflated. Either way the result starts with the file's
    true content, so a reader that checks lengths never sees wrong bytes."""
    if inflater(how) == "isal":
        from isal import igzip as gz, isal_zlib as z
    else:
        import gzip as gz
        import zlib as z
    size = int.from_bytes(raw[-4:], "little") if len(raw) >= 18 else 0
    try:
        out = z.decompress(raw, wbits=31, bufsize=max(size, 1 << 16))
    except z.error:
        out = None
    return out if out is not None and len(out) & 0xFFFFFFFF == size else gz.decompress(raw)


def nifti1_layout(buf) -> dict | None:
    """Shape, dtype (numpy string, the file's byte order), data offset, slope and intercept of a
    single-file NIfTI-1 header, or None.

    Reads the fields as nibabel does: shape ``dim[1..dim[0]]``; dtype from ``datatype``; offset
    ``int(vox_offset)``; slope/intercept as ``Nifti1Header.get_slope_inter`` (slope 0 or not finite →
    (None, None)). None — the caller then uses nibabel — for a pair file, an unknown/complex/RGB type,
    a valid slope with a non-finite intercept, an offset inside the header, or freesurfer's special
    shapes.
    """
    if len(buf) < 348:
        return None
    if struct.unpack_from("<i", buf, 0)[0] == 348:
        e = "<"
    elif struct.unpack_from(">i", buf, 0)[0] == 348:
        e = ">"
    else:
        return None
    if bytes(buf[344:348]) != b"n+1\x00":
        return None
    dim = struct.unpack_from(e + "8h", buf, 40)
    code = struct.unpack_from(e + "h", buf, 70)[0]
    vox_offset, slope, inter = struct.unpack_from(e + "3f", buf, 108)
    ndim = dim[0]
    if not 1 <= ndim <= 7 or min(dim[1:ndim + 1]) < 1 or code not in NIFTI1_DTYPES:
        return None
    shape = tuple(int(d) for d in dim[1:ndim + 1])
    if shape[:3] == (27307, 1, 6):  # nibabel's freesurfer ico7 special case
        return None
    if not math.isfinite(vox_offset) or int(vox_offset) < NIFTI1_SINGLE_MIN_OFFSET:
        return None
    if slope == 0 or not math.isfinite(slope):
        slope = inter = None
    elif not math.isfinite(inter):
        return None
    return {"shape": shape, "dtype": e + NIFTI1_DTYPES[code], "offset": int(vox_offset), "slope": slope,
            "inter": inter}


def read_raw(path, depth: int | None = None, how: str = "auto"):
    """(voxel bytes as a memoryview, dtype string, shape (S, W, H), slope, inter) of a plain single-file
    NIfTI-1 file, or None. The bytes are in the file's byte order and C order ``(S, W, H)``: the first
    ``depth`` slices of the file's ``(H, W, D)`` (a 2-D image is ``(1, W, H)``; trailing singleton
    dimensions beyond the third are dropped)."""
    raw = Path(path).read_bytes()
    buf = inflate(raw, how) if raw[:2] == b"\x1f\x8b" else raw
    lay = nifti1_layout(buf)
    hwd = None if lay is None else _hwd(lay)
    if hwd is None:
        return None
    h, w, d = hwd
    size = int(lay["dtype"][2:])
    if lay["offset"] + h * w * d * size > len(buf):
        return None  # truncated: nibabel names the problem
    s = min(d, depth) if depth else d
    data = memoryview(buf)[lay["offset"]:lay["offset"] + h * w * s * size]
    return data, lay["dtype"], (s, w, h), lay["slope"], lay["inter"]


def _hwd(lay: dict):
    """(H, W, D) of a layout as ``read_raw`` takes it (trailing singletons dropped, 2-D as D=1), or None."""
    shape = list(lay["shape"])
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) not in (2, 3):
        return None
    return tuple(shape + [1] if len(shape) == 2 else shape)


def peek_shape(path, depth: int | None = None):
    """The ``(S, W, H)`` that ``read_raw`` would give for ``path``, from its first few kilobytes (the
    header alone), or None where it cannot tell."""
    import zlib

    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 12)
        if head[:2] == b"\x1f\x8b":
            head = zlib.decompressobj(31).decompress(head, NIFTI1_SINGLE_MIN_OFFSET)
    except (OSError, zlib.error):
        return None
    lay = nifti1_layout(head)
    hwd = None if lay is None else _hwd(lay)
    if hwd is None:
        return None
    h, w, d = hwd
    return (min(d, depth) if depth else d), w, h


def native_bytes(data: memoryview, dtype: str):
    """``data`` in this machine's byte order (a copy only when the file's order differs)."""
    size = int(dtype[2:])
    if dtype[0] == _NATIVE or size == 1:
        return data, _NATIVE + dtype[1:]
    import array

    a = array.array(_SWAP_CODE[size])
    a.frombytes(data)
    a.byteswap()
    return memoryview(a).cast("B"), _NATIVE + dtype[1:]


def read_voxels(path, depth: int | None = None, how: str = "auto"):
    """(voxels, slope, inter) — a numpy array ``(S, W, H)`` in the stored type and native byte
    order, owned and writable — or None (then use ``nifti.read_image``)."""
    import numpy as np

    got = read_raw(path, depth, how)
    if got is None:
        return None
    data, dtype, shape, slope, inter = got
    data, dtype = native_bytes(data, dtype)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy(), slope, inter


def uncompressed_size(path) -> int:
    """Bytes of the file once inflated: gzip's trailer (ISIZE, exact below 4 GiB for one member), else
    the file size. An upper bound for the voxels ``read_raw`` returns."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b" or size < 18:
            return size
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


# ---- worker side -----------------------------------------------------------------------------------
def file_digest(path) -> str:
    """``sha256:size:mtime_ns`` of a file's bytes, the stat taken on the handle the bytes were read from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return f"{h.hexdigest()}:{st.st_size}:{st.st_mtime_ns}"


def serve(fd: int, how: str = "auto") -> None:
    """Worker loop: a task per stdin line ``slot_offset\\tcapacity\\tdepth\\tpath``; one reply line per
    task on stdout: ``ok\\tdtype\\tS,W,H\\tslope\\tinter`` or ``fallback\\treason`` (one task at a time).
    A negative slot offset asks for ``file_digest`` only: ``hash\\tdigest``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle; stdin's end stops us
    mm = None
    out = sys.stdout.fileno()
    for line in sys.stdin.buffer:
        off, cap, depth, path = line.rstrip(b"\n").split(b"\t", 3)
        off, cap, depth, path = int(off), int(cap), int(depth), os.fsdecode(path)
        try:
            if off < 0:
                os.write(out, f"hash\t{file_digest(path)}\n".encode())
                continue
            got = read_raw(path, depth or None, how)
            if got is None:
                reply = "fallback\tnot a plain single-file NIfTI-1 volume"
            elif got[0].nbytes > cap:
                reply = f"fallback\t{got[0].nbytes} bytes do not fit the slot ({cap})"
            else:
                data, dtype = native_bytes(got[0], got[1])
                size = os.fstat(fd).st_size
                if mm is None or len(mm) != size:
                    mm = mmap.mmap(fd, size)
                mm[off:off + data.nbytes] = data
                reply = f"ok\t{dtype}\t{','.join(map(str, got[2]))}\t{got[3]!r}\t{got[4]!r}"
        except Exception as exc:  # the caller reads the file with nibabel, which reports the problem
            reply = f"fallback\t{type(exc).__name__}: {exc}".replace("\n", " ")
        os.write(out, reply.encode(errors="replace")[:4000] + b"\n")


# ---- caller side -----------------------------------------------------------------------------------
def _size_or_zero(path) -> int:
    try:
        return uncompressed_size(path)
    except OSError:  # missing or unreadable: the worker falls back and nibabel reports it
        return 0


def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding medgen_cli
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    return env


class ReaderPool:
    """Worker processes filling slots of one shared memory file (module docstring).

    ``submit(key, path, depth)`` queues a file; ``take(keys)`` yields ``Volume``s of those keys as they
    complete. Use as a context manager (``close`` stops the workers).
    """

    def __init__(self, workers: int, slot_bytes: int, slots: int, inflate: str = "auto"):
        self.slot_bytes = max(_ALIGN, -(-int(slot_bytes) // _ALIGN) * _ALIGN)
        self.nslots = max(1, int(slots))
        self.inflate = inflater(inflate)
        self.fd = os.memfd_create("medgen-eval-volumes", getattr(os, "MFD_CLOEXEC", 0))
        os.ftruncate(self.fd, self.slot_bytes * self.nslots)
        self.mm = mmap.mmap(self.fd, self.slot_bytes * self.nslots)
        code = f"from medgen_cli.metrics.reader import serve; serve({self.fd}, {self.inflate!r})"
        env = _worker_env()
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       pass_fds=(self.fd,), env=env, close_fds=True)
                      for _ in range(max(1, workers))]
        self.sel = selectors.DefaultSelector()
        for w, p in enumerate(self.procs):
            os.set_blocking(p.stdout.fileno(), False)
            self.sel.register(p.stdout, selectors.EVENT_READ, w)
        self.idle = deque(range(len(self.procs)))
        self.free = deque(range(self.nslots))
        self.queue: deque = deque()  # (key, path, depth) not yet given to a worker (depth None: hash only)
        self.busy: dict[int, tuple] = {}  # worker → (key, path, slot)
        self.done: dict = {}  # key → Volume, completed and not yet taken
        self.partial = {w: b"" for w in range(len(self.procs))}
        self.dead: set[int] = set()
        self._digest_ids = itertools.count()
        self._discarded: set = set()  # keys of running reads nobody will take (``discard``)

    @classmethod
    def for_files(cls, paths, workers: int | None = None, slots: int | None = None, inflate: str = "auto"):
        """A pool whose slots fit the largest of ``paths`` (``slots`` default: workers + 2)."""
        paths = list(paths)
        workers = default_workers(len(paths)) if workers is None else workers
        size = max([_size_or_zero(p) for p in paths] + [1])
        want = workers + 2 if slots is None else slots
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 16 << 30
        cap = max(1, min(MAX_POOL_BYTES, ram // 4) // max(size, 1))
        return cls(workers, size, max(1, min(want, cap, max(len(paths), 1) + 1)), inflate)

    @property
    def workers(self) -> int:
        return len(self.procs)

    # -- queueing
    def pending(self) -> set:
        """Keys submitted and not yet taken (queued, running or done)."""
        return {k for k, _, _ in self.queue} | {b[0] for b in self.busy.values()} | set(self.done)

    def submit_files(self, paths, depth: int | None, tag) -> list:
        """Submit ``paths`` under the keys ``(tag, index)`` (those already pending are left as they are,
        so files can be queued ahead of need); the keys."""
        keys = [(tag, i) for i in range(len(paths))]
        pending = self.pending()
        for k, p in zip(keys, paths):
            if k not in pending:
                self.submit(k, p, depth)
        return keys

    def submit(self, key, path, depth: int | None) -> None:
        path = Path(path)
        if "\n" in str(path):  # not expressible in the line protocol: the caller reads it itself
            self.done[key] = Volume(key, path, None, None, None, "newline in the file name")
            return
        self.queue.append((key, path, depth or 0))
        self._dispatch()

    def digests(self, paths) -> list:
        """``file_digest`` of each path, hashed by the workers ahead of any queued reads (None where a
        worker could not: the caller hashes that file itself, which reports the problem)."""
        return self.collect(self.queue_digests(paths))

    def queue_digests(self, paths) -> list:
        """Queue the ``digests`` tasks without waiting; their keys, for ``collect``."""
        keys = [(DigestTask, next(self._digest_ids)) for _ in paths]
        for k, p in reversed(list(zip(keys, paths))):
            if "\n" in str(p):
                self.done[k] = None
            else:
                self.queue.appendleft((k, Path(p), None))
        self._dispatch()
        return keys

    def collect(self, keys, wait: bool = True) -> list | None:
        """The digests queued under ``keys``; ``wait`` False: None unless every one is in already."""
        if not wait:
            self._poll(0)
        while any(k not in self.done for k in keys):
            if not wait:
                return None
            self._poll()
        return [self.done.pop(k) for k in keys]

    def discard(self, keys) -> None:
        """Forget reads submitted under ``keys``: queued ones are dropped, finished ones give their slot
        back, running ones give it back when they finish."""
        keys = set(keys)
        self.queue = deque(t for t in self.queue if t[0] not in keys)
        for k in keys & set(self.done):
            v = self.done.pop(k)
            if v is not None:
                v.release()
        self._discarded |= {b[0] for b in self.busy.values()} & keys

    def _dispatch(self) -> None:
        while self.queue and self.idle and (self.free or self.queue[0][2] is None):
            w = self.idle.popleft()
            if w in self.dead:
                continue
            key, path, depth = self.queue.popleft()
            slot = None if depth is None else self.free.popleft()
            self.busy[w] = (key, path, slot)
            where = -1 if slot is None else slot * self.slot_bytes
            task = f"{where}\t{self.slot_bytes}\t{depth or 0}\t".encode() + os.fsencode(path) + b"\n"
            try:
                self.procs[w].stdin.write(task)
                self.procs[w].stdin.flush()
            except (BrokenPipeError, OSError):
                self._worker_died(w)

    def _release(self, slot: int) -> None:
        self.free.append(slot)
        self._dispatch()

    def _worker_died(self, w: int) -> None:
        self.dead.add(w)
        if w in self.busy:
            key, path, slot = self.busy.pop(w)
            self._failed(key, path, "reader process ended", slot is None, slot)
        try:
            self.sel.unregister(self.procs[w].stdout)
        except (KeyError, ValueError):
            pass
        if len(self.dead) == len(self.procs):  # nothing left to read with: the caller reads the rest
            while self.queue:
                key, path, depth = self.queue.popleft()
                self._failed(key, path, "no reader process left", depth is None)
        self._dispatch()

    # -- results
    def _failed(self, key, path, reason: str, digest_task: bool, slot: int | None = None) -> None:
        """A task that gave nothing: its slot back; a read → a Volume for nibabel, a digest → None."""
        if slot is not None:
            self.free.append(slot)
        if key in self._discarded:
            self._discarded.discard(key)
            return
        self.done[key] = None if digest_task else Volume(key, path, None, None, None, reason)

    def _on_line(self, w: int, line: str) -> None:
        status, *rest = line.split("\t")
        key, path, slot = self.busy.pop(w)
        self.idle.append(w)
        if status == "hash":
            self.done[key] = rest[0]
            return
        if status != "ok":
            self._failed(key, path, rest[0] if rest else "", slot is None, slot)
            return
        import numpy as np

        dtype, shape, slope, inter = rest
        shape = tuple(int(s) for s in shape.split(","))
        arr = np.ndarray(shape, np.dtype(dtype), buffer=self.mm, offset=slot * self.slot_bytes)
        self.done[key] = Volume(key, path, arr, None if slope == "None" else float(slope),
                                None if inter == "None" else float(inter), "", lambda s=slot: self._release(s))
        if key in self._discarded:
            self._discarded.discard(key)
            self.done.pop(key).release()

    def _poll(self, timeout: float | None = None) -> None:
        """Read the replies that are there (waiting up to ``timeout``; None: until one comes)."""
        self._dispatch()
        if not self.busy:
            return
        for sk, _ in self.sel.select(timeout):
            w = sk.data
            try:
                chunk = os.read(sk.fileobj.fileno(), 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self._worker_died(w)
                continue
            data = self.partial[w] + chunk
            *lines, self.partial[w] = data.split(b"\n")
            for line in lines:
                self._on_line(w, line.decode(errors="replace"))
        self._dispatch()

    def take(self, keys) -> Iterator[Volume]:
        """Yield the ``Volume`` of every key in ``keys`` (already submitted), in completion order."""
        want = set(keys)
        while want:
            ready = [k for k in want if k in self.done]
            if not ready:
                if not self.busy:
                    self._dispatch()
                if not self.busy:  # nothing in flight and nothing can start: a caller error, not a wait
                    raise RuntimeError(f"{len(want)} volumes were never submitted to the reader pool" if not self.queue
                                       else "every slot of the reader pool is held: release volumes as they are used")
                self._poll()
                continue
            for k in ready:
                want.discard(k)
                yield self.done.pop(k)
                self._poll(0)  # workers that finished meanwhile get their next file now

    # -- shutting down
    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
        self.sel.close()
        self.done.clear()
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- one entry point for the caller ----------------------------------------------------------------
def _read_in_process(key, path, depth, how) -> Volume:
    try:
        got = read_voxels(path, depth, how)
    except Exception as exc:
        return Volume(key, Path(path), None, None, None, f"{type(exc).__name__}: {exc}")
    if got is None:
        return Volume(key, Path(path), None, None, None, "not a plain single-file NIfTI-1 volume")
    return Volume(key, Path(path), *got)


def open_source(paths, depth: int | None, workers: int, pool: ReaderPool | None = None, tag="",
                inflate: str = "auto") -> Iterator[tuple[int, Volume]]:
    """``(index, Volume)`` for every path, in completion order.

    ``pool`` given: the files go to it (keys ``(tag, index)``; files already submitted under those
    keys are not submitted again). Else ``workers`` 0 reads in this thread, in order; ``workers`` ≥ 1
    starts a pool for these files (threads where memfd is missing) and stops it at the end.
    """
    paths = [Path(p) for p in paths]
    if pool is not None:
        for v in pool.take(pool.submit_files(paths, depth, tag)):
            yield v.key[1], v
        return
    if workers <= 0:
        for i, p in enumerate(paths):
            yield i, _read_in_process(i, p, depth, inflate)
        return
    if not HAVE_MEMFD:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="medgen-read") as ex:
            yield from enumerate(ex.map(lambda ip: _read_in_process(ip[0], ip[1], depth, inflate), enumerate(paths)))
        return
    with ReaderPool.for_files(paths, workers, inflate=inflate) as own:
        yield from open_source(paths, depth, workers, own, tag, inflate)
