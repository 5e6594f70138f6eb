"""Host-memory helpers for conversion: reusable buffers and a fast 2-D transpose.

Converting between torch's [out, in] Linear weights and our [in, out] kernels transposes nearly
every byte of a checkpoint, so the transpose sets the conversion speed. numpy's strided copy moves
one element per step; for 2-byte bf16 that runs at under 1 GB/s. `transpose_into` instead moves
8-byte words holding g = 8 / itemsize neighbouring columns (a transpose of a g-times narrower
matrix), then splits each word back into its g rows, a nearly sequential pass: 2-3x faster here.
"""

from __future__ import annotations

import math

import numpy as np


class Scratch:
    """Reusable buffers, one per named slot, handed out as arrays of any shape.

    Each `get` of a slot invalidates what that slot handed out before. Re-touching the same pages
    is much cheaper than faulting in fresh ones for every tensor: on a small VM first-touch page
    faults cost as much as the copy itself.
    """

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, shape: tuple[int, ...], dtype, slot: str = "") -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if self._bufs.get(slot, np.empty(0, np.uint8)).nbytes < n:
            self._bufs.pop(slot, None)  # free the old one first
            self._bufs[slot] = np.empty(n, np.uint8)
        return self._bufs[slot][:n].view(dtype).reshape(shape)


def transpose_into(dst: np.ndarray, src: np.ndarray, scratch: Scratch | None = None) -> None:
    """dst[...] = src.T for 2-D arrays (views of bigger ones are fine); casts if the dtypes differ.

    `scratch` lends the temporary (as large as src)."""
    rows, cols = src.shape
    size = src.dtype.itemsize
    g = 8 // size
    if (src.dtype != dst.dtype or size not in (1, 2, 4) or cols % g
            or src.strides[1] != size or dst.strides[1] != size):
        _blocked_transpose(dst, src)
        return
    word, unit = np.dtype(np.uint64), np.dtype(f"u{size}")
    wide = (scratch or Scratch()).get((cols // g, rows), word, "transpose")
    _blocked_transpose(wide, src.view(unit).view(word))  # wide[j, r] = src[r, g*j : g*j + g]
    d = dst.view(unit)  # split dst's rows into (cols // g, g): always a view, whatever dst's row stride
    d = np.lib.stride_tricks.as_strided(d, (cols // g, g, rows), (d.strides[0] * g, d.strides[0], d.strides[1]))
    d[...] = wide.view(unit).reshape(cols // g, rows, g).transpose(0, 2, 1)


def _blocked_transpose(dst: np.ndarray, src: np.ndarray, block: int = 128) -> None:
    """dst[...] = src.T a few rows of src at a time (about 2x faster than one strided copy: the rows
    being read and the columns being written stay in cache)."""
    for i in range(0, src.shape[0], block):
        dst[:, i:i + block] = src[i:i + block].T
