"""The backend a program is being built for, and the one switch for backend-specific code.

`jax.default_backend()` names the backend of this *process*. A deviceless GPU compile (aot.py,
`train.py --dry-run --target h100`) builds an H100 program inside a CPU process, so code that
picks a kernel, or a workaround that serves only one backend, asks `platform()` instead: the
platform of the devices of the mesh the step is traced for (`sharding.activation_mesh`), and the
default backend outside one (evaluation, generation: they run where they are).

CPU-only workarounds (each says where it is why, with the measurement behind it):
  model._matmul         2-D GEMM backward written out (XLA:CPU's transposed loop fusions)
  losses._head_grads    LM-head weight gradient behind an optimization_barrier (YNNPACK's fast dot)
  runtime.tune_malloc   glibc arena tuning for XLA:CPU's buffers
On GPU none of them runs: projections are plain einsums under autodiff, the program XLA's GPU
compiler rewrites best (cuBLAS / FP8 GEMM fusions).
"""

from __future__ import annotations

import importlib.util
import os

# jax is imported inside the functions: select_platform runs before JAX exists.


def select_platform() -> None:
    """For the CLIs, before any device is touched: on a machine without an NVIDIA GPU where the CUDA
    plugin is installed anyway (the `aot` extra, for deviceless GPU plans), run on the CPU backend
    instead of letting jax try the plugin, fail and print a traceback. JAX_PLATFORMS, when set,
    decides as usual."""
    if "JAX_PLATFORMS" in os.environ or os.path.exists("/dev/nvidiactl"):
        return
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
        os.environ["JAX_PLATFORMS"] = "cpu"


def platform() -> str:
    """"cpu", "gpu" or "tpu": where the program being traced will run."""
    import jax

    from nemo_jax.sharding import active_mesh

    mesh = active_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def is_cpu() -> bool:
    return platform() == "cpu"


def is_gpu() -> bool:
    return platform() == "gpu"
