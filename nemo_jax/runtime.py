"""Process-level runtime settings for the entry points (train.py, eval.py).

Only one for now: glibc malloc parameters. XLA's CPU runtime allocates every buffer of a step
(activations, gradients, the new parameters and optimizer state) with malloc, and frees them when
the step is done. glibc's defaults serve each block larger than the (dynamic, at most 32 MiB) mmap
threshold with a fresh mmap and give it back with munmap on free; the blocks of threads other than
the main one live in per-thread arenas whose heaps are at most 64 MiB, so bigger blocks are mmapped
whatever the threshold. A fresh mapping is zero pages: every page of every such buffer then
page-faults (and is zeroed by the kernel) once per step, the same work again step after step:
~200k page faults and 10-20% of the wall time of a CPU training step of benchmarks/train_step.py's
model (~0 faults with the settings below; `--also-jax '--jax-malloc default'` there compares).

`tune_malloc()` makes every allocation come from one heap that is never given back to the kernel:

    M_ARENA_MAX 1          one arena: XLA's worker threads allocate from the main heap too (a second
                           arena could not hold the big blocks without mmap)
    M_MMAP_MAX 0           no mmap for big blocks: they are carved from the heap
    M_TRIM_THRESHOLD -1    never trim the heap's top (the next step reuses the same pages)

This changes where memory comes from, never what the program computes. The cost: the process's
resident memory does not shrink back after its peak (freed memory stays in the heap and is what
later allocations reuse), and all threads share one arena lock (XLA's CPU buffers are few and
large; the Python side allocates from the main arena anyway). On GPU the device buffers are not
malloc'd at all, so there it changes little either way.

It is applied at the start of the process, before JAX (and its threads) exist; set
NEMO_JAX_MALLOC=default to keep glibc's defaults, and any `glibc.malloc.*` in GLIBC_TUNABLES (set
before the process started) is respected as is. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: "never trim" (man mallopt)

_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply SETTINGS through mallopt (once per process). True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("NEMO_JAX_MALLOC", "").lower() in ("default", "0", "off", "no"):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user tuned malloc explicitly
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; a parameter an old glibc does not know is left at its default.
    _applied = all([mallopt(param, value) == 1 for param, value in SETTINGS])
    return _applied
