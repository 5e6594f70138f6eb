"""`train.py --dry-run`: will this config fit, and how much work is a step? Loads no weights.

Builds the abstract train state (shapes, dtypes and shardings only), compiles the real train step
for the configured mesh, and reads XLA's own analyses of the compiled program: per-device memory
(arguments, outputs, temporaries) and, where the backend has one, FLOPs (cost analysis).

Two planners:
* `--target h100|h200` compiles the GPU program itself, deviceless (aot.py): for as many GPUs
  as the mesh needs (hosts x GPUs per host: `--num-processes` hosts), on this machine's CPU. Its
  memory is the GPU compiler's own schedule; it also names the attention kernel the program
  contains and counts its (FP8) GEMMs. Deviceless compilation has no autotuning, so GEMMs are
  compiled as cuBLASLt calls (Triton GEMMs off), and cuDNN's workspace is not in the temporaries.
* without it, the program XLA compiles for the CPU (multi-device meshes on fake host devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8). Arguments and outputs are the state,
  exactly; temporaries are the CPU program's, which upcasts bf16 matmuls to f32 and so holds f32
  copies of bf16 weights that no GPU program has.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import model, sharding, train_loop
from nemo_jax.errors import UserError

GiB = 1024**3


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text or "", re.IGNORECASE)
    if not m:
        raise UserError(f"--device-memory: expected a size like 80GB or 141GiB, got {text!r}")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def planned_devices(cfg, target: str, num_processes: int | None):
    """The target GPUs a config's mesh spans: the product of its axes, or with a -1 axis, 8 per host."""
    from nemo_jax import aot

    aot.require()
    hosts = num_processes or 1
    m = cfg.mesh
    sizes = (m.data, m.fsdp, m.tensor, m.sequence)
    n = aot.GPUS_PER_HOST * hosts if -1 in sizes else int(np.prod(sizes))
    return list(aot.devices(target, n, hosts)), hosts


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The real train step of a config, compiled for its mesh (CPU, or a GPU target deviceless)."""

    cfg: object  # the RunConfig
    compiled: object  # jax.stages.Compiled
    setup: object  # trainer.StepSetup
    devices: list
    hosts: int
    target: str | None

    @functools.cached_property
    def hlo(self) -> str:
        return self.compiled.as_text()


def compile_step(cfg, target: str | None = None, num_processes: int | None = None) -> CompiledStep:
    from nemo_jax.run_config import model_config_for
    from nemo_jax.trainer import check_run_config, make_step_setup

    config = model_config_for(cfg)
    if target:
        devices, hosts = planned_devices(cfg, target, num_processes)
    else:
        devices, hosts = jax.devices(), jax.process_count()
    check_run_config(cfg, config, len(devices), hosts)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.sequence, devices=devices)
    setup = make_step_setup(cfg, config, mesh)
    state, frozen = setup.abstract_step_inputs()  # frozen: the LoRA base, distillation teacher or DPO reference
    if frozen is not None and setup.fp8 is not None and setup.fp8.base_fp8:  # targeted kernels in e4m3
        from nemo_jax.fp8 import quantize_base

        q = jax.eval_shape(lambda p: setup.step_params(quantize_base(p, setup.init_fp8(), setup.fp8)[0]),
                           setup.abstract_params())
        frozen = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f.sharding), q, frozen)
    tc = cfg.train
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=setup.batch_sh) for k in train_loop.BATCH_KEYS}
    lowered = setup.step_fn().lower(state, frozen, batch)
    compiled = lowered.compile(compiler_options=GPU_PLAN_OPTIONS) if target else lowered.compile()
    return CompiledStep(cfg, compiled, setup, list(devices), hosts, target)


def dry_run(cfg, device_memory: int | None = None, target: str | None = None,
            num_processes: int | None = None) -> dict:
    from nemo_jax import aot

    t0 = time.time()
    if target:
        device_memory = device_memory or aot.device_memory(target)
    step = compile_step(cfg, target, num_processes)
    compiled, setup, devices, hosts = step.compiled, step.setup, step.devices, step.hosts
    config, mesh, tc = setup.config, setup.mesh, cfg.train
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    n_params = model.count_params(model.abstract_variables(config)["params"])
    n_trainable = model.count_params(setup.abstract_trainable())
    report = {
        "target": target or "cpu",
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "devices": len(devices),
        "hosts": hosts,
        "mesh": dict(mesh.shape),
        "flops_per_step": float(cost.get("flops", 0.0)) if cost else None,
        "model_flops_per_step": train_loop.flops_per_token(config, tc.seq_len, setup.lora is not None)
        * tc.batch_size * tc.seq_len,
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
    if target:
        program = aot.report(step.hlo)
        report.update(attention=program.attention_summary(), attention_kernels=program.attention_kernels,
                      gemms=program.gemms, fp8_gemms=program.fp8_gemms)
    # donated state buffers are reused for the outputs: count them once
    report["peak_bytes"] = report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] \
        + report["temp_bytes"]
    if device_memory:
        report["device_memory"] = device_memory
        report["fits"] = report["peak_bytes"] <= device_memory
    report["compile_seconds"] = time.time() - t0
    return report


# Deviceless GPU compiles do not autotune; with Triton GEMMs off every GEMM is a cuBLASLt call
# whose name says whether it is FP8 (`__cublas$lt$matmul$f8`).
GPU_PLAN_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GiB:,.2f} GiB"
    gpu = r["target"] != "cpu"
    plural = lambda n, word: f"{n} {word}{'s' if n > 1 else ''}"
    where = (f"{r['target'].upper()} program, compiled deviceless for {plural(r['devices'], 'GPU')} on "
             f"{plural(r['hosts'], 'host')}" if gpu else "CPU program (temporaries are the CPU backend's: "
             "bf16 matmuls upcast to f32; plan with --target h100 for the GPU program)")
    lines = [
        f"parameters            {r['parameters']:,} ({r['trainable_parameters']:,} trainable)",
        f"mesh                  {' x '.join(f'{k}={v}' for k, v in r['mesh'].items())} ({r['devices']} devices)",
        f"program               {where}",
    ]
    if r["flops_per_step"]:
        lines.append(f"FLOPs per step        {r['flops_per_step']:.4g} (XLA cost analysis, per device program); "
                     f"model FLOPs {r['model_flops_per_step']:.4g} (all devices)")
    else:
        lines.append(f"model FLOPs per step  {r['model_flops_per_step']:.4g} (all devices)")
    if gpu:
        lines += [f"attention             {r['attention']}",
                  f"GEMMs                 {r['gemms']} cuBLASLt calls, {r['fp8_gemms']} of them FP8"]
    lines += [
        "memory per device (XLA memory analysis):",
        f"  arguments           {g(r['argument_bytes'])}",
        f"  outputs             {g(r['output_bytes'])} ({g(r['alias_bytes'])} reuse donated arguments)",
        f"  temporaries         {g(r['temp_bytes'])}" + (" (cuDNN workspace not included)" if gpu else ""),
        f"  peak                {g(r['peak_bytes'])}",
    ]
    if "fits" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {g(r['device_memory'])} per device")
    lines.append(f"(planned in {r['compile_seconds']:.0f} s)")
    return "\n".join(lines)
