"""Gradients: the training loss's parameter gradients against torch autograd through HF transformers
(and PEFT for LoRA) on packed, loss-masked rows, and every custom VJP against autodiff of its formula.

The model-level comparison runs nemo_jax's real step loss (train_loop.loss_sums: the chunked
custom-VJP cross-entropy, the custom-VJP matmuls, the attention kernel the step picks) under
jax.grad, in fp32, on a tiny random MistralForCausalLM with GQA and head_dim != dim / heads. Error
measure, per tensor: max|ours - torch| / max|torch|.

Already covered elsewhere and not repeated here: blockwise attention's value and gradient against
the dense path with packed segments and padding (test_attention.py), chunked_kl_sum's value and
gradient under a unit cotangent (test_train_step.py), the e4m3 / e5m2 rounding vectors and the
straight-through gradient at scale 1 (test_fp8.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_jax import fp8 as F8
from nemo_jax import model as M
from nemo_jax import train_loop as TL
from nemo_jax.attention import resolve_implementation
from nemo_jax.config import ModelConfig
from nemo_jax.losses import chunked_kl_sum, chunked_nll_sum
from reference.hf_grads import (adapters_to_peft, causal_mask, grads_to_hf, loss_and_grads, params_from_hf,
                                peft_model)
from reference.hf_mistral import save_random_hf

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24)  # GQA 2; head_dim 24 != 64 / 4
CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=96,
                     dtype="float32", param_dtype="float32")
LAYERS_HEADS = (CONFIG.n_layers, CONFIG.n_heads, CONFIG.n_kv_heads, CONFIG.head_dim)
TOL = 1e-4

# kernel -> (documents per row, padding per row, loss chunk). "xla": T = 64, dense attention.
# "blockwise": T = 1100 > 1024, so the step itself picks blockwise attention (3 blocks of 512); a
# document boundary on the block edge at 512 lets it skip the dead block (1, 0), another one falls
# inside block 1, and the last block is partly padding and partly block padding.
LAYOUTS = {
    "xla": ([[20, 27, 11], [40, 24]], [6, 0], 24),
    "blockwise": ([[512, 400, 170]], [18], 512),
}


def packed_batch(docs, pads, seed=0):
    """Rows packed as nemo_jax.data packs them: per document ids[:-1] -> ids[1:], positions from 0,
    segment ids 1, 2, ...; padding is segment 0 with loss mask 0. Each document's first quarter (a
    prompt) and a random fifth of the rest are untrained. (Restarting positions cannot show in the
    gradients: within a document RoPE sees only position differences.)"""
    rng = np.random.default_rng(seed)
    T = sum(docs[0]) + pads[0]
    b = {k: np.zeros((len(docs), T), np.float32 if k == "loss_mask" else np.int32)
         for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    for r, (row, pad) in enumerate(zip(docs, pads)):
        assert sum(row) + pad == T
        t = 0
        for k, n in enumerate(row, 1):
            ids = rng.integers(0, TINY["vocab_size"], n + 1)
            mask = (rng.random(n) > 0.2).astype(np.float32)
            mask[: n // 4] = 0
            b["tokens"][r, t:t + n], b["targets"][r, t:t + n] = ids[:-1], ids[1:]
            b["loss_mask"][r, t:t + n], b["segment_ids"][r, t:t + n] = mask, k
            b["positions"][r, t:t + n] = np.arange(n)
            t += n
    return b


def rel_err(ours: dict, ref: dict) -> dict[str, float]:
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    out = {}
    for name, want in ref.items():
        got = np.asarray(ours[name])
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert np.abs(want).max() > 0, name  # every compared gradient is non-trivial
        out[name] = float(np.abs(got - want).max() / np.abs(want).max())
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_random_hf(tmp_path_factory.mktemp("grad_model") / "hf", seed=3, **TINY)


def hf_model(hf_dir):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()  # autograd works in eval mode; attention_dropout is 0 anyway


def run_jit(f, *args):
    """jax.jit(f)(*args), compiled with XLA's backend (LLVM) optimisation off: the same program, in
    less than half the compile time, which dominates these tests (the run itself takes ~0.1 s)."""
    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def nemo_loss_and_grads(spec, trainable, frozen, batch):
    """The step's loss (sum / trained-token count) and its gradient in the trainable tree."""
    def loss(t, frozen, batch):
        total, count = TL.loss_sums(spec, t, frozen, batch, None)
        return total / count

    value, grads = run_jit(jax.value_and_grad(loss), trainable, frozen, batch)
    return float(value), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("kernel", ["xla", "blockwise"])
def test_full_finetune_gradients_match_transformers(hf_dir, kernel):
    docs, pads, chunk = LAYOUTS[kernel]
    batch = packed_batch(docs, pads)
    B, T = batch["tokens"].shape
    assert resolve_implementation("auto", B, T, CONFIG.head_dim, jnp.float32) == kernel
    assert T % chunk  # the last loss chunk is padded
    model = hf_model(hf_dir)
    want_loss, want = loss_and_grads(model, batch)

    params = jax.tree.map(jnp.asarray, params_from_hf(model.state_dict(), *LAYERS_HEADS))
    spec = TL.StepSpec(CONFIG, None, "none", 1, chunk)
    loss, grads = nemo_loss_and_grads(spec, params, None, batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    errs = rel_err(grads_to_hf(grads, CONFIG.n_layers), want)
    assert len(errs) == 3 + 9 * CONFIG.n_layers
    worst = max(errs, key=errs.get)
    print(f"\n{kernel}: full fine-tune max rel err {errs[worst]:.2e} ({worst}), loss {loss:.6f}")
    assert errs[worst] <= TOL, errs

    # The comparison can fail: torch's gradients without the packing mask, or without the loss
    # mask, differ from the packed, masked ones by far more than the tolerance.
    if kernel == "xla":
        _, mixed = loss_and_grads(model, batch, mask=causal_mask(B, T))
        _, unmasked = loss_and_grads(model, batch, loss_mask=(batch["segment_ids"] > 0).astype(np.float32))
        for other in (mixed, unmasked):
            assert max(rel_err(other, want).values()) > 100 * TOL


@pytest.mark.parametrize("kernel", ["xla", "blockwise"])
def test_lora_gradients_match_peft(hf_dir, kernel):
    docs, pads, chunk = LAYOUTS[kernel]
    batch = packed_batch(docs, pads, seed=1)
    spec_lora = M.LoraSpec(rank=4, alpha=8.0)  # all seven targets, scale 2
    rng = np.random.default_rng(2)
    # A and B both random and non-zero (B at its zero init would make dL/dA vanish)
    shapes = M.abstract_variables(CONFIG, spec_lora)["lora"]
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, (0.1 if p[-1].key == "b" else 1.0 / np.sqrt(
            np.prod(x.shape[1:-1]))), x.shape), jnp.float32), shapes)

    model = hf_model(hf_dir)
    params = jax.tree.map(jnp.asarray, params_from_hf(model.state_dict(), *LAYERS_HEADS))
    peft = peft_model(model, spec_lora.rank, spec_lora.alpha, spec_lora.targets, adapters, CONFIG.n_layers)
    want_loss, want = loss_and_grads(peft, batch)

    spec = TL.StepSpec(CONFIG, spec_lora, "none", 1, chunk)
    loss, grads = nemo_loss_and_grads(spec, adapters, params, batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    errs = rel_err(adapters_to_peft(grads, CONFIG.n_layers, spec_lora.targets), want)
    assert len(errs) == 2 * 7 * CONFIG.n_layers
    worst = max(errs, key=errs.get)
    print(f"\n{kernel}: LoRA max rel err {errs[worst]:.2e} ({worst}), loss {loss:.6f}")
    assert errs[worst] <= TOL, errs


# --- custom VJPs against autodiff of their plain formulas ---------------------------------------------


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32)


def _vjp_check(f, ref, args, rtol=1e-5, atol=1e-6):
    """f and ref agree in value and in their VJP under a random cotangent (not all ones)."""
    def value_and_vjp(fn, ct, args):
        value, vjp = jax.vjp(fn, *args)
        return value, vjp(ct)

    shape = jax.eval_shape(ref, *args).shape
    ct = jnp.asarray(np.random.default_rng(9).normal(size=shape) + 0.5, jnp.float32)
    got, got_grads = run_jit(functools.partial(value_and_vjp, f), ct, args)
    want, want_grads = run_jit(functools.partial(value_and_vjp, ref), ct, args)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    for i, (g, h) in enumerate(zip(got_grads, want_grads)):
        assert float(jnp.abs(h).max()) > 0, i
        np.testing.assert_allclose(g, h, rtol=rtol, atol=atol, err_msg=f"argument {i}")


@pytest.mark.parametrize("x_shape, w_shape, n_in", [
    ((2, 5, 16), (16, 3, 8), 1),  # q/k/v: [B, T, D] . [D, N, H]
    ((2, 5, 3, 8), (3, 8, 16), 2),  # o: [B, T, N, H] . [N, H, D]
    ((7, 16), (16, 4), 1),  # LoRA's a: [.., D] . [D, R]
])
def test_matmul_vjp_equals_tensordot_autodiff(x_shape, w_shape, n_in):
    rng = np.random.default_rng(0)
    x, w = _normal(rng, *x_shape), _normal(rng, *w_shape)
    _vjp_check(lambda x, w: M._matmul(x, w, n_in), lambda x, w: jnp.tensordot(x, w, n_in), (x, w))


def _plain_nll(h, head, targets, mask):
    logp = jax.nn.log_softmax(h @ head, -1)
    return jnp.sum(-jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)


def _plain_kl(h, head, th, t_head, mask):
    logp = jax.nn.log_softmax(h @ head, -1)
    t_logp = jax.nn.log_softmax(th @ t_head, -1)
    return jnp.sum(jnp.sum(jnp.exp(t_logp) * (t_logp - logp), -1) * mask)


@pytest.mark.parametrize("chunk", [7, 30])  # 7 does not divide T = 30; 30 is one chunk (no loop)
def test_chunked_losses_vjp_equal_plain_formula(chunk):
    """Value and VJP under a non-unit cotangent (the custom backward scales by it), for the NLL also
    the mask's cotangent (the per-token NLL)."""
    rng = np.random.default_rng(1)
    B, T, D, V = 2, 30, 16, 50
    h, th = _normal(rng, B, T, D), _normal(rng, B, T, D)
    head, t_head = _normal(rng, D, V, scale=0.3), _normal(rng, D, V, scale=0.3)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)

    nll = lambda h, head, mask: chunked_nll_sum(h, head, targets, mask, chunk)
    _vjp_check(nll, lambda h, head, mask: _plain_nll(h, head, targets, mask), (h, head, mask), rtol=1e-4)
    kl = lambda h, head: chunked_kl_sum(h, head, th, t_head, mask, chunk)
    _vjp_check(kl, lambda h, head: _plain_kl(h, head, th, t_head, mask), (h, head), rtol=1e-4)
    # the teacher gets no gradient
    g_th, g_thead = run_jit(jax.grad(lambda th, t_head: chunked_kl_sum(h, head, th, t_head, mask, chunk), (0, 1)),
                            th, t_head)
    assert float(jnp.abs(g_th).max()) == 0 and float(jnp.abs(g_thead).max()) == 0


def _qdq(x, scale, dtype):
    """Quantise-dequantise written out: x / s, saturated to the format's largest finite value, cast
    (round to nearest even), times s."""
    m = {F8.E4M3: 448.0, F8.E5M2: 57344.0}[dtype]
    return jnp.clip(x / scale, -m, m).astype(dtype).astype(jnp.float32) * scale


def test_fp8_weight_and_input_qdq_equal_straight_through_formula():
    """value and gradient of quantize_weight / quantize_input (non-unit scales, saturation, a
    nonlinear consumer so the gradient depends on the quantised forward value) equal
    x + stop_gradient(qdq(x) - x); the scale gets no gradient; the probe's gradient is amax(x)."""
    rng = np.random.default_rng(3)
    x = _normal(rng, 6, 8, scale=2.0).at[0, 0].set(50.0).at[1, 1].set(-40.0)  # beyond 448 * s: saturated
    scale = jnp.float32(3.0 / 448)
    c = _normal(rng, 6, 8)
    consumer = lambda y: jnp.sum(jnp.sin(y) * c)
    ste = lambda x, s: x + jax.lax.stop_gradient(_qdq(x, jax.lax.stop_gradient(s), F8.E4M3) - x)
    assert float(jnp.abs(ste(x, scale) - x).max()) > 1e-2  # the rounding is visible at this scale

    ours = {"weight": lambda x, s: F8.quantize_weight(x, s),
            "input": lambda x, s: F8.quantize_input(x, s, jnp.zeros((), jnp.float32))}
    want_val, (want_gx, want_gs) = jax.value_and_grad(lambda x, s: consumer(ste(x, s)), (0, 1))(x, scale)
    for name, f in ours.items():
        np.testing.assert_array_equal(f(x, scale), ste(x, scale), err_msg=name)
        val, (gx, gs) = jax.value_and_grad(lambda x, s: consumer(f(x, s)), (0, 1))(x, scale)
        np.testing.assert_allclose(val, want_val, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(gx, want_gx, rtol=1e-6, atol=1e-7, err_msg=name)
        assert float(gs) == float(want_gs) == 0.0, name
    # the probe: its gradient is amax(x) whatever the cotangent
    probe_grad = jax.grad(lambda p: consumer(F8.quantize_input(x, scale, p)))(jnp.zeros((), jnp.float32))
    assert float(probe_grad) == pytest.approx(float(np.abs(np.asarray(x)).max()), rel=1e-7) == 50.0


@pytest.mark.parametrize("current, margin", [(False, 0), (True, 1)])
def test_fp8_output_grad_qdq_in_a_matmul(current, margin):
    """y = quantize_output_grad(x . w): identity forward; the backward rounds dy to e5m2 with the
    given (delayed) scale or with amax(dy) * 2^margin / 57344 (current) before it reaches x and w,
    and the probe's gradient is amax(dy)."""
    rng = np.random.default_rng(4)
    x, w = _normal(rng, 5, 8), _normal(rng, 8, 6)
    ct = _normal(rng, 5, 6).at[0, 0].set(30.0)  # beyond 57344 * the delayed scale: saturated when delayed
    delayed = jnp.float32(1e-4)  # dy / s up to 3e5 > 57344

    def f(x, w, s, p):
        return F8.quantize_output_grad(x @ w, s, p, current, margin)

    y, vjp = jax.vjp(f, x, w, delayed, jnp.zeros((), jnp.float32))
    np.testing.assert_array_equal(y, x @ w)
    gx, gw, gs, gp = vjp(ct)
    amax = float(np.abs(np.asarray(ct)).max())
    s = jnp.float32(amax * 2.0 ** margin / 57344.0) if current else delayed
    dy = _qdq(ct, s, F8.E5M2)
    assert float(jnp.abs(dy - ct).max()) > 1e-3  # the rounding (and for delayed, the saturation) shows
    if not current:
        assert float(dy[0, 0]) == pytest.approx(57344 * 1e-4)
    np.testing.assert_allclose(gx, dy @ w.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gw, x.T @ dy, rtol=1e-6, atol=1e-6)
    assert float(gs) == 0.0
    assert float(gp) == pytest.approx(amax, rel=1e-7)
