"""Context-parallel attention (nemo_jax/context_parallel.py) on 8 fake CPU devices equals one device
(tests/workers/context_parallel_checks.py), and its compiled programs, CPU and H100, pass k/v round
a ring instead of gathering the queries."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workers import run_on_8_devices

from nemo_jax import aot
from nemo_jax import context_parallel as CP
from nemo_jax.errors import UserError
from nemo_jax.run_config import config_from_dict



@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_on_8_devices("context_parallel_checks.py", tmp_path_factory.mktemp("context_parallel") / "result.json")


@pytest.mark.parametrize("case", ["ring-seq8", "ring-fsdp2-seq4-contiguous", "ulysses-tensor2-seq4",
                                  "fused-ring-seq8", "fused-ring-seq8-one-document",
                                  "fused-ring-fsdp2-seq4-contiguous", "fused-ulysses-tensor2-seq4"])
def test_same_attention_and_gradients_as_one_device(result, case):
    """T = 2048, packed documents across device boundaries, padding; GQA; fp32. The fused cases run
    the GPU decomposition (packed call + prefix pieces merged by log-sum-exp round the ring) on
    cuDNN's contracts emulated in plain JAX, with the rows cuDNN leaves undefined set to NaN."""
    assert result["attention_max_err"][case] < 2e-5, result["attention_max_err"]


@pytest.mark.parametrize("mesh", ["seq8", "fsdp2-seq4"])
def test_sequence_parallel_training_logs_the_same_losses(result, mesh):
    ref, got = result["losses"]["single"], result["losses"][mesh]
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got, ref)
    assert ref[-1] < ref[0]


def _gathers_of_length(shapes, T):
    """Gathered float activations of full length: rank >= 3 with a T axis (not the batch's ints:
    token ids, segment ids)."""
    dims = [tuple(int(d) for d in re.search(r"\[([0-9,]*)\]", s).group(1).split(",") if d) for s in shapes]
    return [s for s, d in zip(shapes, dims) if s.startswith(("f", "bf")) and len(d) >= 3 and T in d]


def test_cpu_program_passes_kv_round_a_ring(result):
    ring, baseline, step = (result["collectives"][k] for k in ("ring", "allgather", "train-seq8"))
    # attention: k and v, stacked [2, B, T/8, K, H], hop; only the [B, T] segment ids are gathered
    assert "f32[2,2,256,2,16]" in ring["collective-permute"]
    assert set(ring["all-gather"]) == {"s32[2,2048]"} and ring["all-to-all"] == []
    assert "f32[2,2048,2,4,16]" in baseline["all-gather"]  # q, as [B, T, K, G, H]: the check can see it
    # the whole train step (tiny model: 2 kv heads of 24): k/v hop, no activation is gathered whole
    assert "f32[2,1,256,2,24]" in step["collective-permute"]
    assert _gathers_of_length(step["all-gather"] + step["all-to-all"], 2048) == [], step


def test_ulysses_needs_divisible_kv_heads(result):
    assert "2 kv heads" in result["ulysses_error"] and "use ring" in result["ulysses_error"]


def test_zigzag_layout_literal():
    # 2 devices, 4 chunks of 2: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    assert CP.zigzag_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    for n, T in [(2, 8), (4, 64), (8, 2048)]:
        order = CP.zigzag_order(T, n)
        assert sorted(order.tolist()) == list(range(T))
        np.testing.assert_array_equal(np.asarray(CP.layout_indices(T, n, zigzag=True)), order)  # traced = host
        # every device gets the same causal work: the sum of its tokens' (index + 1) key counts
        work = (order + 1).reshape(n, -1).sum(1)
        assert (work == work[0]).all()


def test_context_parallel_config_key():
    base = {"output_dir": "x", "model": {"preset": "tiny"}, "data": {"train": ["x"]},
            "train": {"steps": 1, "batch_size": 1, "seq_len": 8, "lr": 1e-3}}
    assert config_from_dict(base).mesh.context_parallel == "ring"
    cfg = config_from_dict({**base, "mesh": {"sequence": 2, "context_parallel": "ulysses"}})
    assert cfg.mesh.context_parallel == "ulysses"
    with pytest.raises(UserError, match="mesh.context_parallel: expected one of ring, ulysses, allgather"):
        config_from_dict({**base, "mesh": {"context_parallel": "rings"}})


H100_T = 131072  # NeMo's longest training row; attention shapes of the 12B model


@pytest.mark.skipif(not aot.available(), reason="deviceless H100 compilation needs the aot extra")
def test_h100_program_rings_the_keys():
    """One layer's attention, forward and backward, for 8 H100s on mesh.sequence 8: NeMo's 32 query /
    8 kv heads of 128, bf16, one 131072-token row. Its compiled GPU program passes k/v blocks
    [1, 16384, 8, 128] round the ring, computes every hop's pieces in cuDNN, and never gathers anything
    of full length."""
    from nemo_jax import sharding as S

    program, memory = h100_attention_program(S)
    kernels = re.findall(r'custom_call_target="([^"]+)"', program)
    # every hop's pieces are cuDNN calls (forward and backward), no plain-JAX blocks
    assert kernels.count("__cudnn$fmhaSoftmax") >= 8 and kernels.count("__cudnn$fmhaSoftmaxBackward") >= 8, kernels
    assert " dot(" not in program  # attention alone: any matmul outside cuDNN would be a plain-JAX block
    permuted = set(re.findall(r"= \(?(\w+\[[0-9,]*\])[^=]*? collective-permute(?:-start)?\(", program))
    assert "bf16[2,1,16384,8,128]" in permuted, permuted  # k and v stacked
    gathered = re.findall(r"= \(?(\w+\[[0-9,]*\])[^=]*? all-gather(?:-start)?\(", program)
    assert _gathers_of_length(gathered, H100_T) == [], gathered
    # per device: q/k/v/o and their gradients are 16384 tokens each; nothing [T, T] or full-length
    assert memory.temp_size_in_bytes < 2.5 * 2**30, memory


def h100_attention_program(S):
    mesh = S.make_mesh(sequence=8, devices=list(aot.devices("h100", 8)))
    spec = S.batch_sharding(mesh)
    B, N, K, H = 1, 32, 8, 128
    arg = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=spec)
    args = (arg(B, H100_T, N, H), arg(B, H100_T, K, H), arg(B, H100_T, K, H), arg(B, H100_T, dtype=jnp.int32))

    def f(q, k, v, seg):
        from nemo_jax.attention import attention

        with S.activation_mesh(mesh), CP.layout("ring"):
            out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg), q, k, v)
            return out, vjp(out)

    compiled = jax.jit(f).lower(*args).compile()
    return compiled.as_text(), compiled.memory_analysis()
