"""FP8 GEMMs on Hopper and the plain GPU hot path, asserted on H100 programs compiled deviceless.

The model is NeMo's shape at a fifth of its width (D 1024, 8 query / 2 kv heads of 128, F 3584,
2 layers, V 8192, bf16), built from abstract arguments only: nothing is allocated. What is asserted
is read from the optimized H100 HLO (cuBLASLt calls: Triton GEMMs are off, so every GEMM is a
`__cublas$lt$matmul` call and an FP8 one is `__cublas$lt$matmul$f8`; operand types are those of
the instructions feeding the call):

* the FP8 forward is one e4m3 x e4m3 GEMM per targeted projection and layer (q, k and v stay three
  GEMMs), the LM head the only other GEMM;
* nemo_jax's real QAT step (trainer.make_step_setup + StepSetup.step_fn, as train.py runs it) has, per
  layer, those forward GEMMs and an e5m2 x e4m3 one for each projection's input gradient; the
  e4m3-stored kernels feed them as they are (no bf16 / f32 copy of a targeted kernel anywhere);
* a trained projection's weight gradient is an e4m3 x e5m2 GEMM as well;
* the bf16 LoRA step holds no f32 copy of the LM head or of any base kernel;
* the CPU-only workarounds (model._matmul_cpu, the LM-head barrier) are traced on the CPU only.

Also here, on the CPU: fp8.matmul's value and gradients against the qdq formula it implements, and
delayed scaling seeded from the first step's own amaxes.
"""

import functools
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax import aot
from nemo_jax import fp8 as F8
from nemo_jax import losses
from nemo_jax import model as M
from nemo_jax import sharding as S
from nemo_jax import train_loop as TL
from nemo_jax.config import ModelConfig

needs_aot = pytest.mark.skipif(not aot.available(), reason="needs the aot extra: pip install -e '.[aot]'")

CONFIG = ModelConfig(vocab_size=8192, dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128,
                     hidden_dim=3584, dtype="bfloat16", param_dtype="bfloat16")
B, T = 2, 1024  # 2048 tokens: no activation has a kernel's shape
TARGETS = F8.DEFAULT_TARGETS
NO_TRITON = {"xla_gpu_enable_triton_gemm": False}
F8_CALL = "__cublas$lt$matmul$f8"


def kernel_shapes(config: ModelConfig) -> set[tuple[int, ...]]:
    """Every form a targeted kernel can take in a program: as stored, as a 2-D GEMM operand, transposed."""
    D, N, K, H, F = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim
    two_d = {(D, N * H), (D, K * H), (N * H, D), (D, F), (F, D)}
    return {(D, N, H), (D, K, H), (N, H, D)} | two_d | {s[::-1] for s in two_d}


def fp8_gemm_operands(hlo: str) -> Counter:
    """(lhs type, rhs type) -> count over the program's FP8 GEMM calls."""
    types = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", hlo, re.M))
    calls = re.findall(r"custom-call\(([^)]*)\), custom_call_target=\"" + re.escape(F8_CALL) + '"', hlo)
    out = Counter()
    for operands in calls:
        a, b = (o.strip().lstrip("%") for o in operands.split(",")[:2])
        out[(types.get(a), types.get(b))] += 1
    return out


@functools.cache
def h100_mesh():
    assert jax.default_backend() == "cpu"  # the GPU program is built by this CPU process
    return S.make_mesh(devices=list(aot.devices("h100", 1)))


def compile_for_gpu(fn, *args):
    mesh = h100_mesh()

    def traced(*a):
        with S.activation_mesh(mesh):
            return fn(*a)

    rep = S.replicated(mesh)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), args)
    return jax.jit(traced).lower(*args).compile(compiler_options=NO_TRITON).as_text()


@functools.cache
def real_step_hlo(*overrides: str) -> str:
    """nemo_jax's train step for CONFIG on one H100, as train.py builds it (see plan.compile_step)."""
    from nemo_jax.run_config import load_config
    from nemo_jax.trainer import make_step_setup

    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "model.param_dtype=bfloat16",
                                            f"train.batch_size={B}", f"train.seq_len={T}",
                                            f"train.loss_chunk={T}", *overrides])
    setup = make_step_setup(cfg, CONFIG, h100_mesh())
    state, frozen = setup.abstract_step_inputs()
    if setup.fp8 is not None and setup.fp8.base_fp8:  # the frozen base's targeted kernels in e4m3
        q = jax.eval_shape(lambda p: setup.step_params(F8.quantize_base(p, setup.init_fp8(), setup.fp8)[0]),
                           setup.abstract_params())
        frozen = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f.sharding), q, frozen)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=setup.batch_sh)
             for k in TL.BATCH_KEYS}
    return setup.step_fn().lower(state, frozen, batch).compile(compiler_options=NO_TRITON).as_text()


QAT = ("lora.enabled=true", "lora.rank=16", "fp8.enabled=true", "fp8.amax_history=16")


# --- the H100 programs ------------------------------------------------------------------------------


@needs_aot
def test_fp8_forward_is_one_e4m3_gemm_per_projection_and_layer():
    """Full-model forward (layers unrolled, so each layer's GEMMs are their own calls): 7 targets x 2
    layers FP8 GEMMs, all e4m3 x e4m3, and the LM head's bf16 GEMM, nothing else."""
    spec = F8.Fp8Spec(amax_history=16, quantize_grads=False)
    v = M.abstract_variables(CONFIG, fp8=spec)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def fwd(params, state, tokens):
        return M.forward(CONFIG, params, tokens, fp8=M.Fp8Scaling(spec, state), loop=M.LayerLoop(unroll=CONFIG.n_layers))

    hlo = compile_for_gpu(fwd, v["params"], v["fp8"], tokens)
    program = aot.report(hlo)
    n = len(TARGETS) * CONFIG.n_layers
    assert fp8_gemm_operands(hlo) == {("f8e4m3fn", "f8e4m3fn"): n}
    assert program.fp8_gemms == n and program.gemms == n + 1, program.custom_calls


@needs_aot
def test_real_qat_step_runs_fp8_gemms_forward_and_backward():
    """configs/qat.yaml's step (LoRA on an e4m3-stored base, gradient quantisation, full remat). The
    layers are a scan whose forward and backward bodies hold one layer's GEMMs each, so the counts
    are per layer: the forward's 7, the backward's recomputation of all but `down`'s (whose output
    no gradient needs), and 7 input gradients dy . W^T in e5m2 x e4m3 (the frozen base has no weight
    gradient)."""
    hlo = real_step_hlo(*QAT, "fp8.store_base=true", "model.remat=full")
    assert fp8_gemm_operands(hlo) == {("f8e4m3fn", "f8e4m3fn"): 7 + 6, ("f8e5m2", "f8e4m3fn"): 7}
    # the e4m3 kernels feed the FP8 GEMMs as they are: no dequantised (bf16 or f32) copy exists
    copies = {(dt, s) for dt, s in aot.buffer_shapes(hlo) if s in kernel_shapes(CONFIG) and dt in ("bf16", "f32")}
    assert copies == set()


@needs_aot
@pytest.mark.parametrize("quantize_grads", [True, False])
def test_fp8_linear_gradients(quantize_grads):
    """One trained FP8 projection (q's shapes) under jax.grad: the forward GEMM, and with gradient
    quantisation dx = dy . W^T (e5m2 x e4m3) and dW = x^T . dy (e4m3 x e5m2) as FP8 GEMMs too;
    without it, the two gradient GEMMs are plain bf16 ones."""
    D, N, H = CONFIG.dim, CONFIG.n_heads, CONFIG.head_dim
    meta = F8.new_meta(16)

    def loss(x, w):
        g_meta = meta if quantize_grads else None
        y = F8.matmul(x, w, 1, jnp.float32(0.1), F8.weight_scale(F8.amax(w)), 0.0, g_meta, 0.0)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    hlo = compile_for_gpu(lambda x, w: jax.grad(loss, (0, 1))(x, w), jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
                          jax.ShapeDtypeStruct((D, N, H), jnp.bfloat16))
    want = {("f8e4m3fn", "f8e4m3fn"): 1}
    if quantize_grads:
        want.update({("f8e5m2", "f8e4m3fn"): 1, ("f8e4m3fn", "f8e5m2"): 1})
    assert fp8_gemm_operands(hlo) == want
    assert aot.report(hlo).gemms == 3


@needs_aot
def test_bf16_step_keeps_the_head_and_the_base_in_bf16():
    """A bf16 LoRA step on the GPU: the LM-head backward runs in bf16 with fp32 accumulation (no fp32
    [D, V] copy of the head) and no base kernel is upcast."""
    hlo = real_step_hlo("lora.enabled=true", "lora.rank=16")
    shapes = aot.buffer_shapes(hlo)
    D, V = CONFIG.dim, CONFIG.vocab_size
    f32 = {s for dt, s in shapes if dt == "f32"}
    assert not f32 & {(D, V), (V, D)}, "an fp32 copy of the LM head"
    assert not f32 & kernel_shapes(CONFIG), f"fp32 copies of base kernels: {f32 & kernel_shapes(CONFIG)}"
    assert ("bf16", (D, V)) in shapes  # (the shapes are there to be found: the head itself)
    assert aot.report(hlo).fp8_gemms == 0


@needs_aot
def test_cpu_workarounds_are_traced_on_the_cpu_only():
    """The same functions traced for the CPU (this process's backend) and under an H100 mesh."""
    x, w = jnp.ones((2, 4, 8), jnp.bfloat16), jnp.ones((8, 3, 2), jnp.bfloat16)
    grad = lambda x, w: jax.grad(lambda x, w: jnp.sum(M._matmul(x, w, 1).astype(jnp.float32)), (0, 1))(x, w)
    h, head, dl = jnp.ones((1, 4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16), jnp.ones((1, 4, 16))
    # fresh functions each time: jax caches a trace per function object
    jaxprs = lambda: (str(jax.make_jaxpr(lambda *a: grad(*a))(x, w)),
                      str(jax.make_jaxpr(lambda *a: losses._head_grads(*a))(dl, h, head)))

    cpu_matmul, cpu_head = jaxprs()
    with S.activation_mesh(h100_mesh()):
        gpu_matmul, gpu_head = jaxprs()
    assert "custom_vjp_call" in cpu_matmul and "custom_vjp_call" not in gpu_matmul
    assert "optimization_barrier" in cpu_head and "optimization_barrier" not in gpu_head
    # the GPU's LM-head backward: no fp32 copy of the head or the hidden states, fp32 accumulation
    upcast = re.compile(r"f32\[(8,16|1,4,8)\] = convert_element_type")
    assert upcast.search(cpu_head) and not upcast.search(gpu_head)
    assert gpu_head.count("preferred_element_type=float32") == 2


# --- the CPU side -----------------------------------------------------------------------------------


def _qdq(x, scale, dtype):
    m = F8.fp8_max(dtype)
    return jnp.clip(x / scale, -m, m).astype(dtype).astype(jnp.float32) * scale


@pytest.mark.parametrize("graph", ["cpu", "gpu"])
@pytest.mark.parametrize("stored", [False, True])
def test_fp8_matmul_is_the_qdq_formula(stored, graph, monkeypatch):
    """y = qdq(x) . qdq(W), dx = qdq_e5m2(dy) . qdq(W)^T, dW = qdq(x)^T . qdq_e5m2(dy) in fp32; the
    probes' gradients are amax(x) and amax(dy); an e4m3 kernel is used as it is. Run here on the
    CPU, for both of fp8.matmul's graphs: the CPU's and the GPU's (e4m3 residuals, dequantised at
    the backward's dots; run on the CPU by telling fp8 it is not on one)."""
    if graph == "gpu":
        monkeypatch.setattr(F8.backend, "is_cpu", lambda: False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32).at[0, 0, 0, 0].set(40.0)  # saturates
    w = jnp.asarray(rng.normal(size=(3, 8, 16)) * 0.2, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    sx, sw, sg = jnp.float32(3 / 448), F8.weight_scale(F8.amax(w)), jnp.float32(2 / 57344)
    g_meta = {"amax_history": jnp.ones((4,), jnp.float32), "scale": sg}
    wq = F8.quantize(w, sw) if stored else w

    def f(x, w, px, pg):
        return F8.matmul(x, w, 2, sx, sw, px, g_meta, pg)

    zero = jnp.zeros((), jnp.float32)
    y, vjp = jax.vjp(f, x, wq, zero, zero)
    xq, wdq, dy = _qdq(x, sx, F8.E4M3), _qdq(w, sw, F8.E4M3), _qdq(ct, sg, F8.E5M2)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)  # (summation order)
    close(y, jnp.tensordot(xq, wdq, 2))
    dx, dw, px, pg = vjp(ct)
    close(dx, jnp.tensordot(dy, wdq, ((2,), (2,))))
    if stored:
        assert not np.asarray(dw.astype(jnp.float32)).any()  # the frozen e4m3 base: no gradient
    else:
        close(dw, jnp.tensordot(xq, dy, ((0, 1), (0, 1))))
    assert float(px) == 40.0 and float(pg) == float(jnp.abs(ct).max())


def test_delayed_scaling_is_seeded_by_the_first_step():
    """A delayed site whose history is empty (step 0) quantises with its own amax, x's and dy's alike,
    exactly as the current recipe does, instead of the initial scale 1; once it has a history, the
    history's scale."""
    spec = F8.Fp8Spec(amax_history=4)
    x = jnp.full((3,), 0.5)
    fresh, seen = F8.new_meta(4), F8.update_meta(F8.new_meta(4), 2.0, F8.E4M3, 0)
    assert float(F8.input_scale(spec, x, fresh)) == pytest.approx(0.5 / 448)  # not 1
    assert float(F8.input_scale(spec, x, seen)) == pytest.approx(2.0 / 448)  # the history's, not x's

    # A targeted Linear, as the model runs it: output, input and kernel gradients, observed amaxes.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16)) * 3.0, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(4, 8)) * 1e-3, jnp.float32)

    def run(recipe, history):
        spec = F8.Fp8Spec(recipe=recipe, amax_history=4)
        lin = M.Linear((16,), (8,), ("embed", "mlp"), jnp.float32, jnp.float32, fp8=spec)
        v = lin.init(jax.random.key(0), x)
        state = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.full_like(a, history) if getattr(p[-1], "key", None) == "amax_history" else a, v["fp8"])
        f = lambda x, params, probes: lin.apply({"params": params, "fp8": state, "fp8_obs": F8.as_probes(probes)}, x)
        y, vjp = jax.vjp(f, x, v["params"], jax.tree.map(jnp.zeros_like, v["fp8_obs"]))
        return jax.tree.map(np.asarray, (y, *vjp(ct)))

    jax.tree.map(np.testing.assert_array_equal, run("delayed", 0.0), run("current", 0.0))
    # with a history (and the initial scale 1), the delayed site rounds differently
    assert not np.array_equal(run("delayed", 1e-30)[0], run("current", 1e-30)[0])
