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

import contextlib
import importlib.util
import os

# jax is imported inside the functions: select_platform runs before JAX exists.


def select_platform() -> None:
    """For the CLIs, before JAX exists: on a machine without an NVIDIA GPU where the CUDA plugin is
    installed anyway (the `aot` extra, for deviceless GPU plans), run on the CPU backend instead of
    letting jax try the plugin, fail and print a traceback (JAX_PLATFORMS, when set, decides).

    The plugin's CUDA libraries also log "Could not find cuda drivers" to stderr as they load, from
    C++ before any logging is configured; on the CPU backend that is noise around a one-line
    error, so jax is imported and its plugins registered here with stderr closed. Backends are not
    created (multi-host start-up must still come first).
    """
    if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl") and _cuda_plugin():
        os.environ["JAX_PLATFORMS"] = "cpu"
    if os.environ.get("JAX_PLATFORMS") == "cpu" and _cuda_plugin():
        with _stderr_closed():
            import jax  # noqa: F401
            from jax._src import xla_bridge

            getattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)()


def _cuda_plugin() -> bool:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


@contextlib.contextmanager
def _stderr_closed():
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


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
