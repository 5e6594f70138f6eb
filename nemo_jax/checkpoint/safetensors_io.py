"""Streaming safetensors: read one tensor at a time, write shards one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and [begin, end) byte offsets into the data that follows, then the raw row-major data.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a read touches stays in the
process's resident set until the file is closed, so reading a 5 GB shard tensor by tensor shows 5 GB
of RSS. Reading with plain `readinto` into the destination buffer costs exactly the tensor, and
writing with a header computed up front lets an exporter stream a 5 GB shard without building it in
memory. The header checks mirror the safetensors library's (known dtypes, offsets that tile the data
exactly), so a truncated or corrupt file is reported by name before anything is converted; the
tests cross-check both directions against the library and transformers.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from nemo_jax.checkpoint.staging import start_writeback
from nemo_jax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit
_CHUNK = 1 << 30  # read in 1 GiB pieces (one read() returns at most ~2 GiB on Linux)
_WRITEBACK = 64 << 20  # a background writer starts the disk writes every so many bytes


class Entry:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """The header of one .safetensors file, validated; tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise self._error(f"not a safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise self._error(f"corrupt or truncated header (header length {n}, file size {size})")
                header_bytes = f.read(n)
        except FileNotFoundError:
            raise UserError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise UserError(f"{self.path}: is a directory, expected a .safetensors file") from None
        try:
            header = json.loads(header_bytes)
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise self._error(f"corrupt header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info)
        # The tensors must tile the data region exactly, as the safetensors library requires.
        expected = 0
        for e in sorted(self.entries.values(), key=lambda e: e.begin):
            if e.begin != expected:
                raise self._error(f"corrupt header: tensor {e.name!r} starts at byte {e.begin}, expected {expected}")
            expected = e.end
        available = size - self.data_start
        if available < expected:
            cut = sorted((e for e in self.entries.values() if e.end > available), key=lambda e: e.begin)
            more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
            raise self._error(f"truncated: the header needs {expected} data bytes, the file has {available}; "
                              f"tensor {cut[0].name!r} is cut off{more}")
        if available > expected:
            raise self._error(f"corrupt: {available - expected} bytes after the last tensor")

    def _error(self, msg: str) -> UserError:
        return UserError(f"{self.path}: {msg}")

    def _entry(self, name: str, info) -> Entry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._error(f"corrupt header entry for tensor {name!r}: {info!r}")
        if info["dtype"] not in DTYPES:
            raise self._error(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dtype = DTYPES[info["dtype"]]
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, ValueError):
            raise self._error(f"corrupt header entry for tensor {name!r}: {info!r}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise self._error(f"corrupt header: tensor {name!r} has shape {list(shape)} and dtype {info['dtype']} "
                              f"but spans bytes [{begin}, {end})")
        return Entry(name, dtype, shape, begin, end)

    def read(self, name: str, out: np.ndarray | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (only rows [r0, r1) of its first axis if `rows` is given) as a new array, or
        read into `out`, a C-contiguous array of that shape and the tensor's dtype."""
        e = self.entries[name]
        shape, offset = e.shape, self.data_start + e.begin
        if rows is not None:
            r0, r1 = rows
            row_bytes = e.nbytes // e.shape[0] if e.shape[0] else 0
            shape = (r1 - r0,) + e.shape[1:]
            offset = offset + r0 * row_bytes
        if out is None:
            out = np.empty(shape, e.dtype)
        assert out.shape == shape and out.dtype == e.dtype and out.flags.c_contiguous, (out.shape, shape)
        if not read_into(self.path, offset, out):
            raise self._error(f"truncated while reading tensor {name!r}")
        return out


def read_into(path: Path, offset: int, out: np.ndarray) -> bool:
    """Fill the C-contiguous `out` with the file's bytes from `offset`; False if the file ends first."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(buf):
            n = os.preadv(f.fileno(), [buf[pos:pos + _CHUNK]], offset + pos)
            if n <= 0:
                return False
            pos += n
    return True


class Writer:
    """Writes one .safetensors file tensor by tensor, in the order given up front.

    The header (names, dtypes, shapes, offsets) is fixed at construction, so each tensor can go
    straight to disk as it is produced.

    With `background=True` a thread does the writing, so the disk writes (on a VM, mostly faulting
    in fresh page-cache pages) overlap whatever produces the next block. `write` then only queues
    its arrays: the caller must not modify them afterwards, except blocks taken from `block()`, a
    small pool of buffers that come back once written. At most `depth` blocks wait in the queue.
    An error in the thread is raised by the next `write` or by `close`; leaving the `with` block
    always stops and joins the thread.
    """

    def __init__(self, path: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, background: bool = False, depth: int = 4):
        self.path = Path(path)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        self._expected = []
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as the library does
        self.nbytes = 8 + len(raw) + offset
        self._f = open(self.path, "wb", buffering=0)
        self._written = self._flushed = 0
        self._thread, self._error, self._pool = None, None, None
        self._put(memoryview(struct.pack("<Q", len(raw)) + raw))
        self._next = 0
        if background:
            self._queue = queue.Queue(maxsize=depth)
            self._pool = queue.Queue()  # free buffers handed out by block()
            self._pooled = 0
            self._lent: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(block) -> (block, its buffer)
            self._depth = depth
            self._thread = threading.Thread(target=self._run, name=f"write {self.path.name}", daemon=True)
            self._thread.start()

    def block(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous buffer to fill and pass to `write` (background mode: reused once written)."""
        dtype = np.dtype(dtype)
        if self._pool is None:
            return np.empty(shape, dtype)
        n = math.prod(shape) * dtype.itemsize
        if self._pooled < self._depth + 2:  # one queued per slot, one being written, one being filled
            self._pooled += 1
            buf = np.empty(n, np.uint8)
        else:
            buf = None
            while buf is None:
                self._check()
                try:
                    buf = self._pool.get(timeout=0.5)
                except queue.Empty:
                    pass
            if buf.nbytes < n:
                buf = None  # free the small one before allocating
                buf = np.empty(n, np.uint8)
        view = buf[:n].view(dtype).reshape(shape)
        self._lent[id(view)] = (view, buf)
        return view

    def write(self, name: str, parts: np.ndarray | Iterable[np.ndarray]) -> None:
        """Write the next tensor: an array, or its consecutive row blocks (each written as it comes)."""
        want_name, want_dtype, want_shape = self._expected[self._next]
        parts = [parts] if isinstance(parts, np.ndarray) else parts
        rows = 0
        for x in parts:
            if name != want_name or x.dtype != want_dtype or x.shape[1:] != want_shape[1:]:
                raise AssertionError(f"{self.path}: writing {name} {x.dtype} {x.shape}, expected "
                                     f"{self._expected[self._next]}")
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
            if x.nbytes:
                self._submit(x)
            rows += x.shape[0] if x.ndim else 1
        if rows != (want_shape[0] if want_shape else 1):
            raise AssertionError(f"{self.path}: wrote {rows} rows of {name}, expected {want_shape}")
        self._next += 1

    def _submit(self, x: np.ndarray) -> None:
        if self._thread is None:
            self._put(memoryview(x.reshape(-1).view(np.uint8)))
            return
        while True:
            self._check()
            try:
                self._queue.put(x, timeout=0.5)
                return
            except queue.Full:
                pass

    def _put(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):  # a raw write may write less than asked
            pos += self._f.write(data[pos:pos + _CHUNK])
        self._written += len(data)
        if self._thread is not None and self._written - self._flushed >= _WRITEBACK:
            start_writeback(self._f.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def _run(self) -> None:
        while True:
            x = self._queue.get()
            try:
                if x is None:
                    return
                if self._error is None:
                    try:
                        self._put(memoryview(x.reshape(-1).view(np.uint8)))
                    except BaseException as e:  # reported by the producer; keep draining so it never blocks
                        self._error = e
                lent = self._lent.pop(id(x), None)
                if lent is not None:
                    self._pool.put(lent[1])
                del x, lent
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until everything queued so far is written (so the caller may reuse those arrays)."""
        if self._thread is not None:
            self._queue.join()  # the thread marks every item done, after an error too
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError(f"{self.path}: the writer thread stopped")

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # the thread always drains the queue, so this returns
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        if self._next != len(self._expected):
            raise AssertionError(f"{self.path}: {len(self._expected) - self._next} tensors were not written")
        try:
            self._stop()
            if self._error is not None:
                raise self._error
        finally:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            try:
                self._stop()
            finally:
                self._f.close()


def tensor_readers(directory) -> dict:
    """Every tensor of a directory's .safetensors files: name -> a function reading it (a numpy array)."""
    out = {}
    for p in sorted(Path(directory).glob("*.safetensors")):
        f = SafetensorsFile(p)
        out.update({name: (lambda f=f, name=name: f.read(name)) for name in f.entries})
    return out
