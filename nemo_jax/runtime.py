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
large; the Python side allocates from the main arena anyway).

It serves XLA:CPU only, so it is skipped in a process that will run on a GPU: there the step's
buffers are device memory, never malloc'd, so the page faults it removes do not exist, while its
costs (one arena lock for every host thread, CUDA's and the data pipeline's included, and a heap
that never shrinks) would remain. The decision has to be made before JAX exists (applying it
first is the point), so it is taken from the environment, not from a backend: a GPU process is one
whose JAX_PLATFORMS lists cuda, rocm or gpu first (JAX's default backend), or, with JAX_PLATFORMS
unset, one on a machine with an NVIDIA device node (/dev/nvidia0 or /dev/nvidiactl), where JAX
picks the GPU. JAX_PLATFORMS=cpu keeps a GPU machine's process on the CPU, tuned.

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

GPU_PLATFORMS = ("cuda", "rocm", "gpu")
GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl")

_applied: bool | None = None


def will_use_gpu(environ=os.environ, exists=os.path.exists) -> bool:
    """Whether this process's JAX will run on a GPU, decided before JAX is imported (module docstring)."""
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] in GPU_PLATFORMS  # JAX's first listed platform is its default backend
    return any(exists(node) for node in GPU_DEVICE_NODES)


def tune_malloc() -> bool:
    """Apply SETTINGS through mallopt (once per process) unless the process will use a GPU. True when
    they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("NEMO_JAX_MALLOC", "").lower() in ("default", "0", "off", "no"):
        return False
    if will_use_gpu():
        return False  # XLA:CPU's buffers are what it serves; a GPU's are not malloc'd
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
