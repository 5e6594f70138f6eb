"""Blockwise (flash) attention against the dense XLA path, and the segment mask on literal cases.

The reference is `jax.nn.dot_product_attention` with an explicit dense mask, the path the model used
before; the blockwise kernel must match it in value and in gradient for every kind of mask it skips
work for: causal future blocks, packed documents, padding, sequence lengths that are not whole blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax.attention import attention, attention_mask, resolve_implementation

T = 37  # not a multiple of any block size used below


def _segments(B, T):
    """Row 0: three documents then padding; row 1: one long document then padding; row 2: unpacked."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :10], seg[0, 10:25], seg[0, 25:33] = 1, 2, 3
    seg[1, :30] = 1
    seg[2:] = 1
    return jnp.asarray(seg)


def _inputs(B, T, N, K, H, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(r.normal(size=s), dtype) for s in
                  [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)])
    return q, k, v, w


def _value_and_grads(implementation, q, k, v, w, seg, **kw):
    """Output and d(sum(out * w))/d(q, k, v): a random cotangent exercises every output element."""
    f = lambda q, k, v: attention(q, k, v, seg, implementation=implementation, **kw)
    loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * w).sum()
    return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("N,K,block_q,block_kv,causal", [
    (4, 4, 8, 16, True),  # MHA; query blocks smaller than key blocks
    (4, 2, 16, 8, True),  # GQA 2; key blocks smaller than query blocks
    (8, 2, 8, 8, True),  # GQA 4
    (8, 2, 64, 64, True),  # one block larger than T (clipped to T, no padding)
    (4, 2, 16, 8, False),  # segments only
])
def test_blockwise_matches_dense(N, K, block_q, block_kv, causal):
    q, k, v, w = _inputs(3, T, N, K, 8)
    seg = _segments(3, T)
    want, want_grads = _value_and_grads("xla", q, k, v, w, seg, causal=causal)
    got, got_grads = _value_and_grads("blockwise", q, k, v, w, seg, causal=causal, block_q=block_q, block_kv=block_kv)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, h in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_attention_mask_literal():
    # Two documents (1, 2) and a padding tail (0): each token sees the earlier tokens of its own document.
    mask = attention_mask(jnp.array([[1, 1, 2, 2, 2, 0]]))[0, 0]
    np.testing.assert_array_equal(mask.astype(int), [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_no_leakage_between_documents(implementation):
    # Document A is tokens 0-4, document B tokens 5-11 (it straddles the 4-token blocks A uses).
    seg = jnp.array([[1] * 5 + [2] * 7])
    q, k, v, _ = _inputs(1, 12, 4, 2, 8)
    r = np.random.default_rng(1)
    noise = lambda x: x.at[:, 5:].set(jnp.asarray(r.normal(size=x[:, 5:].shape), x.dtype))
    f = jax.jit(lambda q, k, v: attention(q, k, v, seg, implementation=implementation, block_q=4, block_kv=4))
    before, after = f(q, k, v), f(noise(q), noise(k), noise(v))
    np.testing.assert_array_equal(before[:, :5], after[:, :5])
    assert not np.allclose(before[:, 5:], after[:, 5:])
    # ... and no gradient flows from A's outputs into B's inputs.
    grads = jax.grad(lambda q, k, v: f(q, k, v)[:, :5].sum(), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.asarray(g)[:, 5:] == 0)


def test_bf16_close_to_fp32():
    q, k, v, w = _inputs(3, T, 8, 2, 16)
    seg = _segments(3, T)
    want, want_grads = _value_and_grads("xla", q, k, v, w, seg)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got, got_grads = _value_and_grads("blockwise", *bf16, w, seg, block_q=8, block_kv=16)
    assert got.dtype == jnp.bfloat16
    for g, h in zip((got, *got_grads), (want, *want_grads)):
        g = np.asarray(g.astype(jnp.float32))
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, h, atol=6e-2, rtol=3e-2)


def test_blockwise_never_holds_the_score_matrix():
    """The compiled forward+backward needs less scratch than one head's fp32 [T, T] scores."""
    B, T, N, K, H = 1, 4096, 4, 2, 64
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    seg = jnp.ones((B, T), jnp.int32)

    def temp_bytes(implementation):
        loss = lambda q, k, v: attention(q, k, v, seg, implementation=implementation).sum()
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(sd(B, T, N, H), sd(B, T, K, H), sd(B, T, K, H)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("blockwise") < T * T * 4 < temp_bytes("xla")


def test_auto_choice():
    assert resolve_implementation("auto", 1, 1024, 128, jnp.bfloat16) == "xla"
    assert resolve_implementation("xla", 1, 131072, 128, jnp.bfloat16) == "xla"
    if jax.default_backend() != "gpu":
        assert resolve_implementation("auto", 1, 8192, 128, jnp.bfloat16) == "blockwise"
    if jax.default_backend() != "gpu":
        assert resolve_implementation("auto", 1, 131072, 128, jnp.bfloat16) == "blockwise"


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(1, 8, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of K"):
        attention(q, k, v)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_honours_segments():
    """cuDNN's packed layout (per-row document tables) agrees with blockwise on packed GQA rows:
    documents do not see each other (and jax's GQA key-offset bug is mended)."""
    Tc = 2048
    q, k, v, w = _inputs(2, Tc, 8, 2, 128, dtype=jnp.bfloat16)
    seg = np.zeros((2, Tc), np.int32)
    seg[0, :700], seg[0, 700:1500], seg[0, 1500:2000] = 1, 2, 3
    seg[1, :] = 1
    seg = jnp.asarray(seg)
    want, want_grads = _value_and_grads("blockwise", q, k, v, w, seg)
    got, got_grads = _value_and_grads("cudnn", q, k, v, w, seg)
    for g, h in zip((got, *got_grads), (want, *want_grads)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), atol=6e-2, rtol=3e-2)


def test_segment_table_literal():
    """cuDNN's packed layout: per row, the length and first index of each run of equal ids (the
    padding run too), -1 for unused entries; the run count says whether the table held them all."""
    from nemo_jax.cudnn import segment_table

    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1] * 7, [1, 2, 3, 4, 5, 6, 0]], jnp.int32)
    lengths, offsets, n_runs = segment_table(seg, max_runs=4)
    assert lengths.tolist() == [[3, 2, 2, -1], [7, -1, -1, -1], [1, 1, 1, 1]]
    assert offsets.tolist() == [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]]
    assert n_runs.tolist() == [3, 1, 7]  # the last row overflows a 4-entry table


def test_cudnn_key_offsets_use_the_keys_stride():
    """jax 0.10.2 scales packed key offsets by the query's N·H; under GQA they must be K·H apart
    (jax PR #39521). The mended conversion gives element offsets of the keys' own layout."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from nemo_jax.cudnn import wrapper

    fixed = wrapper()._fix_seqlen_offsets
    B, T, N, K, H = 2, 8, 4, 2, 16
    q, k = jnp.zeros((B, T, N, H)), jnp.zeros((B, T, K, H))
    lengths = jnp.array([[3, 5, -1], [8, -1, -1]], jnp.int32)
    offsets = jnp.array([[0, 3, -1, -1], [0, -1, -1, -1]], jnp.int32)
    q_len, kv_len, q_off, kv_off = fixed(lengths, lengths, offsets, offsets, q, k)
    # Row-major [B, T, heads, H]: token t of row b starts at (b * T + t) * heads * H.
    assert q_off.tolist()[0][:3] == [0, 3 * N * H, T * N * H]
    assert kv_off.tolist()[0][:3] == [0, 3 * K * H, T * K * H]
    assert q_len.tolist()[0][:3] == kv_len.tolist()[0][:3] == [3, 5, 8]
    assert fa._fix_seqlen_offsets is fixed  # jax's own calls get the mended one
