"""GPU programs without a GPU: deviceless compilation for H100 / H200, and what their HLO holds.

XLA can compile for a GPU it does not have. With the `aot` extra installed
(`pip install -e '.[aot]'`: jax-cuda12-plugin and cuDNN, pinned in pyproject.toml) and the process
on the CPU backend (JAX_PLATFORMS=cpu), `get_topology_desc(platform="cuda", target_config=...)`
returns device descriptions of the target GPUs; a jitted function lowered with abstract arguments
whose shardings live on a mesh of those devices compiles into the optimized GPU program: its HLO
(custom calls to cuDNN / cuBLASLt, fusions, buffer shapes) and its per-device memory analysis.

That program is what `train.py --dry-run --target h100` reports on and what tests/test_gpu_programs.py
asserts on. What it does not give (nemo_jax/targets/README-style notes in the README's planning
section): GEMM autotuning (Triton's default GEMM configs are chosen), cuDNN workspace sizes (not in
the temporaries), cost analysis, and any error when the program exceeds device memory (the
planner compares memory itself).

Targets are XLA GpuTargetConfig text protos in nemo_jax/targets/: the H100 80GB SXM one as
published with jax issue #28376; the H200 differs only in memory size and bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import Counter
from pathlib import Path

from nemo_jax.errors import UserError

_TARGET_DIR = Path(__file__).parent / "targets"
H100_PROTO = _TARGET_DIR / "h100-sxm.txtpb"
MiB = 1024**2

# name -> (device memory in bytes, memory bandwidth in bytes/s, device description)
TARGETS = {
    "h100": (84_929_347_584, 3_352_320_000_000, "NVIDIA H100 80GB HBM3"),  # the proto as it is
    "h200": (143_771 * MiB, 4_800_000_000_000, "NVIDIA H200"),  # 141 GB HBM3e as the driver reports it
}
GPUS_PER_HOST = 8


def available() -> bool:
    """Whether deviceless GPU compilation can run here (the `aot` extra is installed)."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise UserError("--target: compiling for a GPU without one needs the aot extra "
                        "(pip install -e '.[aot]': jax-cuda12-plugin and cuDNN)")


def use_cpu_backend() -> None:
    """Keep this process on the CPU backend (call before any device is touched): the GPU program
    is built by the CPU process, and with no GPU the CUDA plugin would only fail."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")


def target_config(target: str) -> str:
    """The GpuTargetConfig text proto of a target."""
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    memory, bandwidth, name = TARGETS[target]
    text = H100_PROTO.read_text()
    text = re.sub(r"device_memory_size: \d+", f"device_memory_size: {memory}", text)
    text = re.sub(r"memory_bandwidth: \d+", f"memory_bandwidth: {bandwidth}", text)
    return re.sub(r'device_description_str: "[^"]*"', f'device_description_str: "{name}"', text)


def device_memory(target: str) -> int:
    target_config(target)  # validates the name
    return TARGETS[target][0]


@functools.cache
def devices(target: str, n_devices: int, n_hosts: int = 1) -> tuple:
    """Device descriptions of `n_devices` target GPUs over `n_hosts` hosts (equal shares)."""
    require()
    if n_devices % n_hosts:
        raise UserError(f"--target: {n_devices} GPUs cannot be split evenly over {n_hosts} hosts "
                        "(--num-processes)")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                        topology=f"1x{n_hosts}x{n_devices // n_hosts}")
    return tuple(topo.devices)


# --- what a compiled GPU program holds ---------------------------------------------------------------

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_SHAPE = re.compile(r"\b(pred|s8|u8|s32|u32|s64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """The facts the planner prints and the GPU-program tests assert, read from optimized HLO."""

    custom_calls: Counter  # custom-call target -> count

    @property
    def attention_kernels(self) -> dict[str, int]:
        return {k: v for k, v in self.custom_calls.items() if "fmha" in k or "flash" in k.lower()}

    @property
    def fp8_gemms(self) -> int:
        return sum(v for k, v in self.custom_calls.items() if k.startswith("__cublas$lt$matmul$f8"))

    @property
    def gemms(self) -> int:
        return sum(v for k, v in self.custom_calls.items() if k.startswith("__cublas$"))

    def attention_summary(self) -> str:
        k = self.attention_kernels
        if k:
            return ", ".join(f"{name} x{n}" for name, n in sorted(k.items()))
        return "no fused kernel: XLA's own ops (the dense or the blockwise path)"


def report(hlo_text: str) -> ProgramReport:
    return ProgramReport(Counter(_CUSTOM_CALL.findall(hlo_text)))


def buffer_shapes(hlo_text: str) -> set[tuple[str, tuple[int, ...]]]:
    """Every (dtype, shape) that appears in the program's instructions."""
    return {(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(hlo_text)}


def square_buffers(hlo_text: str, length: int) -> set[tuple[str, tuple[int, ...]]]:
    """Buffers with two trailing dims of `length` (a [.., T, T] score, mask or bias)."""
    return {(dt, s) for dt, s in buffer_shapes(hlo_text) if len(s) >= 2 and s[-1] == s[-2] == length}
