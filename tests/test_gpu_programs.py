"""The GPU programs themselves: the shipped 12B configs' train steps compiled for H100, deviceless.

What these assert is read from the optimized H100 HLO and XLA's memory analysis for it (aot.py,
plan.compile_step), not argued from CPU behaviour: the attention kernel, the absence of [T, T]
buffers, and per-device memory within the bounds the README states. Each 12B program is compiled
once per session (module-scoped fixture) and serves several tests.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax import aot

pytestmark = pytest.mark.skipif(not aot.available(), reason="needs the aot extra (pip install -e '.[aot]')")

GiB = 1024**3
# The README's planning table states these bounds (per device, 12B, H100 programs).
MEMORY_BOUNDS_GIB = {"lora": 32.0, "full": 40.0}
TWELVE_B = ["model.checkpoint=null", "model.preset=mistral-nemo-12b"]


@functools.cache
def compiled(name: str, *overrides: str):
    from nemo_jax.plan import compile_step
    from nemo_jax.run_config import load_config

    assert jax.default_backend() == "cpu"  # the GPU program is built by this CPU process
    return compile_step(load_config(f"configs/{name}.yaml", [*TWELVE_B, *overrides]), target="h100")


@pytest.mark.parametrize("name", ["lora", "full", "qat"])
def test_shipped_configs_run_fused_segment_aware_attention(name):
    step = compiled(name)
    program = aot.report(step.hlo)
    assert program.custom_calls["__cudnn$fmhaSoftmax"] >= 1, program.attention_summary()
    assert program.custom_calls["__cudnn$fmhaSoftmaxBackward"] >= 1, program.attention_summary()
    # Packed documents reach cuDNN as per-row tables of runs, never as a dense mask or bias.
    T = step.cfg.train.seq_len
    assert aot.square_buffers(step.hlo, T) == set(), f"{name}: [.., {T}, {T}] buffers in the H100 program"
    fmha = [line for line in step.hlo.splitlines() if "__cudnn$fmhaSoftmax" in line]
    assert all("s32[" in line for line in fmha), "the fused kernel takes segment lengths/offsets"


@pytest.mark.parametrize("name", ["lora", "full"])
def test_shipped_configs_fit_within_the_readme_bounds(name):
    mem = compiled(name).compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    assert peak / GiB <= MEMORY_BOUNDS_GIB[name], f"{name}: {peak / GiB:.2f} GiB per H100"
    assert peak < aot.device_memory("h100")


def test_full_fine_tune_shards_over_eight_gpus():
    step = compiled("full")
    assert len(step.devices) == 8 and dict(step.setup.mesh.shape)["fsdp"] == 8
    # FSDP: each device holds an eighth of the fp32 master weights and both Adam moments.
    args = step.compiled.memory_analysis().argument_size_in_bytes
    assert args / GiB == pytest.approx(12_247_782_400 * 4 * 3 / 8 / GiB, rel=0.01)


def test_long_rows_stay_linear_in_memory():
    """A 131072-token row on one GPU: still the fused kernel and no [T, T] buffer (32 GiB in bf16)."""
    T = 131072
    step = compiled("lora", f"train.seq_len={T}", "train.batch_size=1", "train.micro_batch_size=null",
                    "train.loss_chunk=2048")
    assert aot.report(step.hlo).attention_kernels
    assert aot.square_buffers(step.hlo, T) == set()


def test_planner_reports_the_gpu_program():
    from nemo_jax.plan import dry_run, format_report
    from nemo_jax.run_config import load_config

    report = dry_run(load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "train.seq_len=256"]), target="h200")
    text = format_report(report)
    assert report["device_memory"] == aot.device_memory("h200") > aot.device_memory("h100")
    assert "__cudnn$fmhaSoftmax" in report["attention"] and report["fits"]
    assert "H200 program, compiled deviceless for 1 GPU" in text and "cuDNN workspace not included" in text


def test_planned_gpus_follow_the_mesh_and_the_hosts():
    from nemo_jax.plan import planned_devices
    from nemo_jax.run_config import load_config

    cfg = load_config("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=-1"])
    devices, hosts = planned_devices(cfg, "h100", 2)
    assert (len(devices), hosts) == (16, 2)
    assert {d.process_index for d in devices} == {0, 1}


def test_packed_gqa_kernel_per_device_on_a_sharded_batch():
    """Rows sharded over fsdp reach cuDNN per device (shard_map): 2 rows on 2 GPUs, GQA 4:1."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from nemo_jax import sharding as S
    from nemo_jax.attention import attention

    mesh = S.make_mesh(fsdp=2, devices=list(aot.devices("h100", 2)))
    B, T, N, K, H = 2, 4096, 8, 2, 128
    rows = NamedSharding(mesh, P("fsdp"))
    sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=rows)

    def grads(q, k, v, seg):
        with S.activation_mesh(mesh):
            return jax.grad(lambda q, k, v: attention(q, k, v, seg).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    hlo = jax.jit(grads).lower(sd(B, T, N, H), sd(B, T, K, H), sd(B, T, K, H), sd(B, T, dt=jnp.int32)).compile().as_text()
    fmha = [line for line in hlo.splitlines() if 'custom_call_target="__cudnn$fmhaSoftmax"' in line]
    assert fmha and all(re.search(rf"bf16\[1,{T},{N},{H}\]", line) for line in fmha), "per-device rows: B = 1"
    assert aot.square_buffers(hlo, T) == set()


def test_cpu_keeps_its_own_kernels():
    """The same attention traced for the CPU (no target mesh) never asks for cuDNN."""
    from nemo_jax.attention import attention

    q = jnp.zeros((1, 2048, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 2048, 2, 64), jnp.bfloat16)
    hlo = jax.jit(lambda q, k, v: attention(q, k, v)).lower(q, kv, kv).compile().as_text()
    assert "cudnn" not in hlo
    np.testing.assert_equal(aot.square_buffers(hlo, 2048), set())


@pytest.mark.parametrize("kind,bound,codes", [("nf4", 16.0, "u8[40,"), ("int8", 17.5, "s8[40,")])
def test_qlora_fits_the_readme_bound_without_a_full_precision_base(kind, bound, codes):
    """configs/qlora.yaml (seq 4096) with an NF4 (as shipped) or INT8 base: within the README's bound, and
    no stacked kernel in the compute dtype anywhere in the program (each layer's is dequantised inside
    the scan)."""
    step = compiled("qlora", *([] if kind == "nf4" else ["lora.quantize_base=int8", "lora.double_quant=false"]))
    mem = step.compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    assert peak / GiB <= bound, f"qlora {kind}: {peak / GiB:.2f} GiB per H100"
    c = step.setup.config
    D, F, N, K, H, L = c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers
    stacked = [(D, N, H), (D, K, H), (N, H, D), (D, F), (F, D), (D, N * H), (D, K * H), (N * H, D)]
    shapes = {f"bf16[{L},{','.join(map(str, s))}]" for s in stacked}
    found = {s for s in shapes if s in step.hlo}
    assert not found, f"full-precision stacked kernels in the QLoRA program: {found}"
    assert codes in step.hlo  # the quantised codes are what the step takes
