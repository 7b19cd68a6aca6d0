"""The storage tier of expert offloading (``--memory-budget``): routed experts stay in the
checkpoint's safetensors files and are read, on a few I/O threads, into a fixed number of
slots in host memory (the :class:`~megrez.engine.offload.ExpertCache` decides which).

Where an expert lies: the safetensors header (or a GGUF file's tensor table: there the experts
of a layer are one stacked tensor per projection, each expert a contiguous slice, kept in the
file's type, quantized or not) gives every tensor's byte range, so each
expert's three projections (``model.layers.O.mlp.experts.J.{gate,up,down}_proj.weight``) map to
three ranges. Writers sort tensor names, so the three of one expert are adjacent in the
file and merge into one read; a file where they are not costs one read per projection (no
repacking is needed for correctness, only a little speed).

Reads bypass the page cache, so the memory budget is real and a benchmark measures the
storage: ``O_DIRECT`` into page-aligned buffers (a range is widened to 4 KiB boundaries and
the tensors are views at their offsets inside it). Where a file system refuses ``O_DIRECT``
the file is read normally and its pages are dropped right after with
``posix_fadvise(POSIX_FADV_DONTNEED)``; the statistics say which (``io``).

A file that changes under a running model must not produce wrong tokens: every read checks
the file's size, inode and modification time against those seen at load, a short read is an
error, and each expert's bytes carry a cheap checksum (64-bit XOR of samples spread over them)
taken at its first read and checked at every later one. Errors are :class:`~megrez.loading.CheckpointError`\\ s naming the
file, the tensor and the byte range.
"""
from __future__ import annotations

import mmap
import os
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loading.common import CheckpointError
from ..loading.safetensors import SafetensorsFile
from ..quant.formats import FLOAT_QTYPES, QType, QuantTensor, row_bytes
from .offload import Key, OffloadStats, Transfer

ALIGN = 4096         # O_DIRECT alignment of offsets, lengths and buffers (covers 512-byte devices)
MERGE_GAP = 16384    # tensors closer than this in a file are read together
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Conversions done on the I/O threads (exact: widening only), file dtype -> compute dtype.
WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def _align_down(n: int) -> int:
    return n - n % ALIGN


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Piece:
    """One tensor of an expert: where it lies and where it lands in its read's buffer."""
    name: str
    proj: str
    offset: int           # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple          # the logical shape ([rows, k] also for a quantized matrix)
    delta: int = 0        # offset in the read's buffer (the read starts at an aligned offset)
    qtype: int | None = None  # a GGUF block type: the bytes are kept as they are, a QuantTensor


@dataclass(frozen=True)
class Run:
    """One contiguous read: file bytes [start, start + length) (aligned), holding ``pieces``."""
    file: int
    start: int
    length: int
    pieces: tuple
    need_end: int         # the last byte a piece needs (absolute): a read ending before it is short


class CheckpointFile:
    """An open checkpoint file: O_DIRECT where the file system allows it, else buffered reads
    whose pages are dropped after use."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        st = os.stat(path)
        self.identity = (st.st_size, st.st_ino, st.st_mtime_ns)
        self.fd, self.direct = -1, False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError:
                self.fd = -1
        if self.fd < 0:
            try:
                self.fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open it to read routed experts ({e.strerror})") from None
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.direct else "buffered+POSIX_FADV_DONTNEED"

    def check(self, what: str) -> None:
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot stat it before reading {what} ({e.strerror})") from None
        now = (st.st_size, st.st_ino, st.st_mtime_ns)
        if now != self.identity:
            size, _, mtime = self.identity
            how = (f"truncated to {st.st_size} bytes (was {size})" if st.st_size < size else
                   f"its size changed from {size} to {st.st_size} bytes" if st.st_size != size else
                   "it was modified (its modification time changed)")
            raise CheckpointError(f"{self.path}: the checkpoint changed on disk while the model was running: {how}. "
                                  f"Routed experts are read from it during generation ({what} was next); restore "
                                  f"the file or load the model again")

    def read(self, view: memoryview, offset: int, what: str) -> int:
        """Read into ``view`` from ``offset``; returns the bytes read (short only at the end of
        the file)."""
        got = 0
        while got < len(view):
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as e:
                if self.direct and e.errno == 22 and got == 0:  # EINVAL: O_DIRECT refused at read time
                    self._reopen_buffered()
                    continue
                raise CheckpointError(f"{self.path}: reading {what} (bytes {offset + got}..{offset + len(view)}) "
                                      f"failed: {e.strerror}") from None
            if n == 0:
                break
            got += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return got

    def _reopen_buffered(self) -> None:
        with self._lock:
            if self.direct:
                fd = os.open(self.path, os.O_RDONLY)
                old, self.fd, self.direct = self.fd, fd, False
                os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ExpertStore:
    """Where every routed expert of a Megrez2 model lies in its checkpoint files (safetensors
    files, or one GGUF file as a :class:`~megrez.loading.gguf.GGUFCheckpoint`), and the files,
    open for reading. ``dtype``: the compute dtype the slots hold (quantized experts stay
    quantized)."""

    def __init__(self, model, files: list, dtype: torch.dtype, direct: bool = True):
        args = model.args
        self.dtype = dtype
        owners = sorted({args.owner(i) for i in range(args.num_hidden_layers) if args.is_moe(i)})
        inter, hidden = args.moe_intermediate_size, args.hidden_size
        expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        self.shapes = expected
        found: dict[Key, dict[str, tuple[int, Piece]]] = {}
        readers = [f if hasattr(f, "tensors") or isinstance(f, SafetensorsFile) else SafetensorsFile(Path(f))
                   for f in files]
        for n, reader in enumerate(readers):
            pieces = _gguf_pieces(reader, owners, args.n_routed_experts) if hasattr(reader, "tensors") else \
                _safetensors_pieces(reader, owners, args.n_routed_experts)
            for owner, expert, piece in pieces:
                if tuple(piece.shape) != expected[piece.proj]:
                    raise CheckpointError(f"{reader.path}: tensor {piece.name!r} has shape {list(piece.shape)}, "
                                          f"expected {list(expected[piece.proj])} from config.json")
                if piece.qtype is None and (piece.dtype, dtype) not in WIDENING and piece.dtype != dtype:
                    raise CheckpointError(
                        f"{reader.path}: tensor {piece.name!r} is stored in {str(piece.dtype).replace('torch.', '')}; "
                        f"with --memory-budget routed experts are read as stored and only widened (bfloat16/float16 "
                        f"-> float32), not narrowed to {str(dtype).replace('torch.', '')}: use --dtype float32 or a "
                        f"checkpoint saved in that dtype")
                found.setdefault((owner, expert), {})[piece.proj] = (n, piece)
        missing = [f"model.layers.{o}.mlp.experts.{e}.{p}.weight" for o in owners for e in range(args.n_routed_experts)
                   for p in PROJECTIONS if p not in found.get((o, e), {})]
        if missing:
            where = readers[0].path.parent if readers else "checkpoint"
            raise CheckpointError(f"{where}: checkpoint is missing {len(missing)} routed expert tensor(s): "
                                  + ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))
        self.paths = [r.path for r in readers]
        self.runs: dict[Key, tuple[Run, ...]] = {key: self._plan(pieces) for key, pieces in found.items()}
        # Slots can be views into the read buffers when no expert needs converting or realigning.
        size = torch.empty((), dtype=dtype).element_size()
        every = [p for runs in self.runs.values() for r in runs for p in r.pieces]
        self.views = all(p.qtype is not None or (p.dtype == dtype and p.offset % size == 0) for p in every)
        if not self.views and any(p.qtype is not None for p in every):
            raise CheckpointError(f"{readers[0].path}: routed experts are stored partly quantized and partly in a "
                                  f"float type other than {str(dtype).replace('torch.', '')}; with --memory-budget "
                                  f"pass --dtype to match the float ones")
        self.expert_bytes = max(sum(p.nbytes for _, p in pieces.values()) for pieces in found.values()) \
            if self.views else 3 * inter * hidden * size
        self.quantized = sorted({QType(p.qtype).name for p in every if p.qtype is not None})
        self.span = max(sum(r.length for r in runs) for runs in self.runs.values())  # bytes one expert's reads take
        self.reads_per_expert = max(len(runs) for runs in self.runs.values())
        self.files = [CheckpointFile(p, direct) for p in self.paths]
        self._finalizer = weakref.finalize(self, _close_all, self.files)

    @staticmethod
    def _plan(pieces: dict[str, tuple[int, Piece]]) -> tuple[Run, ...]:
        """The fewest aligned reads covering an expert's three tensors."""
        ordered = sorted(pieces.values(), key=lambda fp: (fp[0], fp[1].offset))
        groups: list[list[tuple[int, Piece]]] = []
        for fp in ordered:
            last = groups[-1][-1] if groups else None
            if last is not None and last[0] == fp[0] and fp[1].offset - (last[1].offset + last[1].nbytes) <= MERGE_GAP:
                groups[-1].append(fp)
            else:
                groups.append([fp])
        runs = []
        for group in groups:
            start = _align_down(group[0][1].offset)
            end = max(p.offset + p.nbytes for _, p in group)
            placed = tuple(Piece(p.name, p.proj, p.offset, p.nbytes, p.dtype, p.shape, p.offset - start, p.qtype)
                           for _, p in group)
            runs.append(Run(group[0][0], start, _align_up(end) - start, placed, end))
        return tuple(runs)

    @property
    def io_mode(self) -> str:
        return ", ".join(sorted({f.mode for f in self.files}))

    def close(self) -> None:
        self._finalizer()


def _safetensors_pieces(reader: SafetensorsFile, owners: list[int], n_experts: int):
    """(owner, expert, piece) for each routed expert tensor of a safetensors file."""
    for name, (tdtype, shape, begin, end) in reader.entries.items():
        m = EXPERT_KEY.match(name)
        if not m:
            continue
        owner, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        if owner in owners and expert < n_experts:  # load_weights reports tensors the model does not have
            yield owner, expert, Piece(name, proj, reader.data_start + begin, end - begin, tdtype, tuple(shape))


def _gguf_pieces(ckpt, owners: list[int], n_experts: int):
    """(owner, expert, piece) for each routed expert of a GGUF file: slices of the stacked
    ``ffn_{gate,up,down}_exps`` tensors (rows of one expert are contiguous in the file)."""
    for ours, (t, qtype, shape) in ckpt.tensors.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", ours)
        if not m or int(m.group(1)) not in owners:
            continue
        owner, proj = int(m.group(1)), m.group(2)
        each = int(t.n_bytes) // shape[0]
        if each * shape[0] != int(t.n_bytes) or each != shape[1] * row_bytes(qtype, shape[2]):
            raise CheckpointError(f"{ckpt.path}: tensor {t.name!r} holds {int(t.n_bytes)} bytes, which is not "
                                  f"{shape[0]} experts of {list(shape[1:])} {qtype.name} weights")
        quantized = qtype not in FLOAT_QTYPES
        for e in range(min(shape[0], n_experts)):
            yield owner, e, Piece(f"{t.name}[{e}]", proj, int(t.data_offset) + e * each, each,
                                  torch.uint8 if quantized else FLOAT_QTYPES[qtype], tuple(shape[1:]),
                                  qtype=int(qtype) if quantized else None)


def _close_all(files) -> None:
    for f in files:
        f.close()


SAMPLES = 64  # 64-byte blocks an expert's checksum covers, spread over its bytes


def _checksum(buf: np.ndarray) -> int:
    """64-bit XOR of ``SAMPLES`` 64-byte blocks spread evenly over ``buf`` (its first and last
    included) and of its length. A pass over every byte would cost about as much CPU as the
    read itself (0.1-0.5 ms per MiB measured on a 2-core machine, time taken from the compute
    threads); the samples cost microseconds. Changes made through the file system are caught
    by the size/inode/mtime check in any case; this catches the rest wherever it lands on a
    sample (a rewritten tensor always does)."""
    n = len(buf)
    if n <= SAMPLES * 64:
        picked = buf
    else:
        starts = np.linspace(0, n - 64, SAMPLES).astype(np.int64)
        picked = buf[starts[:, None] + np.arange(64)].reshape(-1)
    m = len(picked) - len(picked) % 8
    words = np.ascontiguousarray(picked[:m]).view(np.uint64)
    value = int(np.bitwise_xor.reduce(words)) if m else 0
    return value ^ int.from_bytes(bytes(picked[m:]), "little") ^ n


class StorageTransfer(Transfer):
    """Checkpoint files -> slots in host memory, on ``io_threads`` I/O threads (``os.preadv``
    releases the GIL, so reads run while the model computes). Slots live in one anonymous
    mapping (page-aligned, filled on first use); where the file holds the experts in the
    compute dtype, a slot *is* the read buffer and the weights are views into it; otherwise each
    thread reads into its own aligned buffer and widens the values into the slot."""

    name = "storage-to-ram"

    def __init__(self, store: ExpertStore, num_slots: int, io_threads: int = 4):
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        self.store, self.num_slots, self.io_threads = store, num_slots, io_threads
        self.expert_bytes = store.expert_bytes
        inter, hidden = store.shapes["gate_proj"]
        if store.views:
            self.stride = store.span
            self._map = mmap.mmap(-1, max(num_slots * self.stride, 1))
            self._raw = torch.frombuffer(self._map, dtype=torch.uint8)
            self.slot_tensors = None
            self.nbytes = num_slots * self.stride
        else:
            self.stride = store.span
            self._map = None
            dtype = store.dtype
            self.slot_tensors = (torch.empty(num_slots, inter, hidden, dtype=dtype),
                                 torch.empty(num_slots, inter, hidden, dtype=dtype),
                                 torch.empty(num_slots, hidden, inter, dtype=dtype))
            self.nbytes = num_slots * self.expert_bytes + io_threads * self.stride
        self._views: list = [None] * num_slots
        self._local = threading.local()
        self._checksums: dict = {}
        self._lock = threading.Lock()
        self._inflight, self._busy, self._busy_since, self._collected = 0, 0.0, 0.0, 0.0
        self.bytes_read = self.reads = 0
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="megrez-io")

    @staticmethod
    def slots_for(store: ExpertStore, cache_bytes: int, io_threads: int) -> int:
        """Slots that ``cache_bytes`` holds (staging buffers included)."""
        if store.views:
            return int(cache_bytes // store.span)
        return int((cache_bytes - io_threads * store.span) // store.expert_bytes)

    @staticmethod
    def slot_bytes(store: ExpertStore) -> int:
        return store.span if store.views else store.expert_bytes

    # -- reads (on the I/O threads)
    def _enter(self) -> None:
        with self._lock:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1

    def _leave(self, nbytes: int) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._busy += time.perf_counter() - self._busy_since
            self.bytes_read += nbytes
            self.reads += 1

    def _staging(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.stride)
        return memoryview(buf)

    def _read(self, key: Key, slot: int) -> None:
        store = self.store
        direct = self.slot_tensors is None
        target = memoryview(self._map)[slot * self.stride:(slot + 1) * self.stride] if direct else self._staging()
        pos = 0
        what = f"routed expert {key[1]} of layer {key[0]}"
        sums = []
        for run in store.runs[key]:
            f = store.files[run.file]
            f.check(what)
            self._enter()
            n = 0
            try:
                n = f.read(target[pos:pos + run.length], run.start, what)
            finally:
                self._leave(n)
            if run.start + n < run.need_end:
                names = ", ".join(p.name for p in run.pieces)
                raise CheckpointError(f"{f.path}: {names}: the header puts these bytes at {run.start}..{run.need_end} "
                                      f"but only {run.start + n} could be read; the file is truncated")
            data = np.frombuffer(target, dtype=np.uint8, count=run.need_end - run.pieces[0].offset,
                                 offset=pos + run.pieces[0].delta)
            sums.append(_checksum(data))
            if not direct:
                self._widen(run, target, pos, slot)
            pos += run.length
        first = self._checksums.setdefault(key, sums)
        if first != sums:
            raise CheckpointError(f"{store.paths[store.runs[key][0].file]}: the bytes of {what} differ from those read "
                                  f"from this file earlier in the run; the checkpoint changed on disk. Restore it or "
                                  f"load the model again")

    def _widen(self, run: Run, buf: memoryview, pos: int, slot: int) -> None:
        index = {p: i for i, p in enumerate(PROJECTIONS)}
        for p in run.pieces:
            dst = self.slot_tensors[index[p.proj]][slot]
            src = np.frombuffer(buf, dtype=np.uint8, count=p.nbytes, offset=pos + p.delta)
            out = dst.view(-1).numpy() if dst.dtype != torch.bfloat16 else dst.view(-1).view(torch.int16).numpy()
            if p.dtype == dst.dtype:
                out.view(np.uint8)[:] = src
            elif p.dtype == torch.bfloat16:  # bfloat16 -> float32: the high half of the float32 bits
                np.left_shift(src.view(np.uint16).astype(np.uint32), 16, out=out.view(np.uint32))
            else:  # float16 -> float32
                out[:] = src.view(np.float16)

    # -- the Transfer interface (on the main thread)
    def start(self, key: Key, slot: int):
        if self.slot_tensors is None:
            base = slot * self.stride
            pos, parts = 0, {}
            for run in self.store.runs[key]:
                for p in run.pieces:
                    a = base + pos + p.delta
                    raw = self._raw[a:a + p.nbytes]
                    parts[p.proj] = raw.view(p.dtype).view(p.shape) if p.qtype is None else \
                        QuantTensor(raw.view(p.shape[0], -1), p.qtype, p.shape)
                pos += run.length
            self._views[slot] = tuple(parts[p] for p in PROJECTIONS)
        return self.pool.submit(self._read, key, slot)

    def wait(self, handle, layer: int, stats: OffloadStats) -> None:
        if handle.done():
            handle.result()
            return
        t = time.perf_counter()
        handle.result()  # raises the read's error, naming the file
        if layer >= 0:
            stats.stall(layer, time.perf_counter() - t)

    def settle(self, handle) -> None:
        handle.result()  # an I/O thread may still be writing the slot (and a failed read is an error)

    def weights(self, slot: int):
        if self.slot_tensors is None:
            return self._views[slot]
        return tuple(t[slot] for t in self.slot_tensors)

    def busy_seconds(self) -> float:
        with self._lock:
            return self._busy + (time.perf_counter() - self._busy_since if self._inflight else 0.0)

    def collect(self, stats: OffloadStats) -> None:
        with self._lock:  # the server reads statistics from another thread
            busy = self._busy + (time.perf_counter() - self._busy_since if self._inflight else 0.0)
            stats.copy_seconds += busy - self._collected
            self._collected = busy

    def reset(self) -> None:
        with self._lock:
            self._busy, self._collected = 0.0, 0.0
            self._busy_since = time.perf_counter()
            self.bytes_read = self.reads = 0

    def describe(self) -> dict:
        busy = self.busy_seconds()
        return {"io": self.store.io_mode, "io_threads": self.io_threads, "bytes_read": self.bytes_read,
                "reads": self.reads, "read_seconds": busy,
                "read_bandwidth": self.bytes_read / busy if busy > 0 else 0.0,
                "reads_per_expert": self.store.reads_per_expert, "slot_bytes": self.slot_bytes(self.store),
                "slot_views": self.store.views, "expert_types": self.store.quantized or [str(self.store.dtype)[6:]]}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._views = [None] * self.num_slots
