"""Causal GQA attention over packed documents, and the choice of kernel; rope; decoding's attention.

    attention(q [B, T, N, H], k, v [B, T, K, H], segment_ids [B, T]) -> [B, T, N, H]
    cached_attention(q, k, v, k_cache, v_cache, cached_valid, new_token_mask(new_valid))   (decoding)

Query t attends to key s when s <= t (causality on the sequence index) and both carry the same
segment id. Packing puts several documents in one row, each with its own id; padding is segment 0,
which attends only to padding, so no real row is ever fully masked. Positions do not enter the
mask: documents are contiguous, so "earlier index, same document" is "earlier position, same
document", and RoPE has already put the positions into q and k.

Three implementations compute the same thing:

* "xla": `jax.nn.dot_product_attention` with the dense [B, 1, T, T] mask. It materialises fp32
  scores [B, N, T, T] (8.6 GB per layer at T = 8192 with 32 heads, and more for the backward), so it
  is only for short sequences, where it is also the fastest.

* "blockwise": flash attention in plain JAX, for long sequences on any backend. Queries are cut
  into blocks of `block_q` and keys into blocks of `block_kv`; for each query block the key blocks
  are visited in order while an online softmax keeps, per row, the running max m, the running sum
  l of exp(score - m) and the running, unnormalised output acc (all fp32). When a new block raises
  the max, the old l and acc are rescaled by exp(m_old - m_new), so the result equals the full
  softmax without ever holding more than [B, N, block_q, block_kv] scores. Key blocks wholly in
  the causal future are never visited, and blocks whose segments cannot meet (their ranges of ids
  are disjoint, common when packing many short documents) are skipped by a `lax.cond`.
  The backward pass is FlashAttention-2's, written by hand (`jax.custom_vjp`): the forward keeps
  only q, k, v, the output and the per-row log-sum-exp (O(T·N·H) residuals); the backward
  recomputes each block's probabilities from them. Loops are `lax` loops, so compile time does not
  depend on T. GQA is native: q is viewed as [B, T, K, G = N/K, H] and k/v are never repeated.

* "cudnn": cuDNN's fused flash attention (GPU, bf16/fp16, Hopper or later) in its *packed*
  layout, which takes the documents of each row natively (nemo_jax/cudnn.py): no [T, T] mask or
  bias exists anywhere, forward or backward. It is run per device under `shard_map`
  (`_per_device`).

`implementation="auto"` picks from the per-device shapes of the program being built
(backend.platform(): a deviceless H100 compile counts as a GPU): "cudnn" on a GPU whenever it
applies, else "xla" while T·T <= XLA_MAX_SCORES, else "blockwise".
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from nemo_jax import context_parallel, cudnn

Implementation = Literal["auto", "xla", "blockwise", "cudnn"]

XLA_MAX_SCORES = 1024 * 1024  # "auto" uses the dense path up to T·T of this; on CPU blockwise wins from T ~ 1024

# Masked scores enter the running max as this, not -inf: a row that has seen only masked keys
# keeps a finite max, so exp(m_old - m_new) is never exp(-inf + inf) = NaN.
_MASKED = -1e30


def attention_mask(segment_ids, causal: bool = True):
    """Dense mask for the XLA path: bool [B, 1, T, T], True where query t may attend to key s."""
    T = segment_ids.shape[-1]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask &= jnp.tril(jnp.ones((T, T), dtype=bool))
    return mask[:, None]


def resolve_implementation(implementation: Implementation, batch: int, length: int, head_dim: int,
                           dtype) -> str:
    """The kernel "auto" runs for these per-device shapes on the backend being built for."""
    if implementation != "auto":
        return implementation
    if cudnn.applies(head_dim, dtype):
        return "cudnn"
    if length * length <= XLA_MAX_SCORES:
        return "xla"
    return "blockwise"


def attention(q, k, v, segment_ids=None, *, causal: bool = True, implementation: Implementation = "auto",
              block_q: int = 512, block_kv: int = 512):
    """Self-attention over packed documents.

    q: [B, T, N, H]; k, v: [B, T, K, H] with N a multiple of K; segment_ids: int [B, T] (None: one
    document per row). Returns [B, T, N, H] in q's dtype, scaled by 1/sqrt(H). `block_q`/`block_kv`
    only affect "blockwise" (they are clipped to T; T need not be a multiple of them).
    """
    B, T, N, H = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape}/{v.shape} are not [B, T, N, H] and "
                         "[B, T, K, H] with N a multiple of K")
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    if implementation == "auto" and context_parallel.applies(T):  # T split over a mesh: ring / Ulysses
        return context_parallel.attention(q, k, v, segment_ids, causal=causal)
    kind = resolve_implementation(implementation, B, T, H, q.dtype)
    if kind == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, causal))
    if kind == "cudnn":
        return _per_device(functools.partial(cudnn.packed, causal=causal), q, k, v, segment_ids)
    if kind == "blockwise":
        return _blockwise(q, k, v, segment_ids, causal, min(block_q, T), min(block_kv, T))
    raise ValueError(f"attention: unknown implementation {implementation!r}; "
                     "expected 'auto', 'xla', 'blockwise' or 'cudnn'")


def _per_device(kernel, q, k, v, segment_ids):
    """Runs `kernel` on each device's rows and heads (shard_map), so that it sees per-device shapes.

    jax's cuDNN wrapper would otherwise go through its custom partitioning rule, which fails on
    meshes with size-1 axes (an AssertionError in jax's sharding parsing for the 4-axis mesh). Rows
    follow the batch sharding; heads are split only when both the query and the kv heads divide, so
    every device keeps whole GQA groups.
    """
    from nemo_jax.sharding import active_mesh, logical_to_spec

    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    rows = logical_to_spec(("batch",), mesh, q.shape[:1])
    heads = logical_to_spec(("heads",), mesh, q.shape[2:3])
    if heads != logical_to_spec(("kv_heads",), mesh, k.shape[2:3]):
        heads = P(None)
    spec = P(rows[0], None, heads[0], None)  # q, k, v and the output: [B, T, heads, H]
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(rows[0], None)),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


def _blockwise(q, k, v, segment_ids, causal, block_q, block_kv):
    """Pads T up to whole blocks, runs the flash kernel on [B, T, K, G, H] queries, and unpads.

    Padded queries get segment -1 and padded keys -2: they match nothing real nor each other, so
    padded keys are never attended and padded query rows come out as zeros (then dropped).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    Tq, Tk = -(-T // block_q) * block_q, -(-T // block_kv) * block_kv
    pad = lambda x, to, value=0: jnp.pad(x, [(0, 0), (0, to - T)] + [(0, 0)] * (x.ndim - 2),
                                         constant_values=value)
    segment_ids = segment_ids.astype(jnp.int32)
    out = _flash(pad(q, Tq).reshape(B, Tq, K, N // K, H), pad(k, Tk), pad(v, Tk),
                 pad(segment_ids, Tq, -1), pad(segment_ids, Tk, -2), causal, block_q, block_kv)
    return out.reshape(B, Tq, N, H)[:, :T]


def _live_blocks(q_seg, kv_seg, block_q, block_kv):
    """bool [nq, nk]: whether some row of the batch may have an unmasked pair in block (i, j).

    Conservative: two blocks can share a document only if their ranges of segment ids overlap.
    """
    B = q_seg.shape[0]
    qb, kb = q_seg.reshape(B, -1, block_q), kv_seg.reshape(B, -1, block_kv)
    q_lo, q_hi = qb.min(-1)[:, :, None], qb.max(-1)[:, :, None]
    k_lo, k_hi = kb.min(-1)[:, None, :], kb.max(-1)[:, None, :]
    return ((q_lo <= k_hi) & (k_lo <= q_hi)).any(0)


def _block_mask(q_seg, kv_seg, i, j, block_q, block_kv, causal):
    """bool [B, 1, 1, block_q, block_kv] (broadcasts over K, G) for query block i and key block j."""
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        rows = i * block_q + jnp.arange(block_q)
        cols = j * block_kv + jnp.arange(block_kv)
        mask &= rows[:, None] >= cols[None, :]
    return mask[:, None, None]


def _first_q_block(j, block_q, block_kv, causal):
    """The first query block that can see key block j (earlier ones lie wholly before it)."""
    return (j * block_kv) // block_q if causal else 0


def _kv_block_end(i, block_q, block_kv, n_kv, causal):
    """One past the last key block that query block i can see (later ones lie in its future)."""
    return jnp.minimum(((i + 1) * block_q - 1) // block_kv + 1, n_kv) if causal else n_kv


def _scores(qi, kj):
    """[B, bq, K, G, H] x [B, bk, K, H] -> fp32 [B, K, G, bq, bk], scaled by 1/sqrt(H)."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qi, kj, preferred_element_type=jnp.float32)
    return s * (qi.shape[-1] ** -0.5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_seg, kv_seg, causal, block_q, block_kv):
    """q [B, Tq, K, G, H], k/v [B, Tk, K, H], whole blocks -> [B, Tq, K, G, H] in q's dtype."""
    return _flash_forward(q, k, v, q_seg, kv_seg, causal, block_q, block_kv)[0]


def _flash_forward(q, k, v, q_seg, kv_seg, causal, block_q, block_kv):
    B, Tq, K, G, H = q.shape
    n_q, n_kv = Tq // block_q, k.shape[1] // block_kv
    live = _live_blocks(q_seg, kv_seg, block_q, block_kv)

    def query_block(i):
        qi = lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=1)
        qs = lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)

        def visit(j, carry):
            m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, H]
            kj = lax.dynamic_slice_in_dim(k, j * block_kv, block_kv, axis=1)
            vj = lax.dynamic_slice_in_dim(v, j * block_kv, block_kv, axis=1)
            ks = lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv, axis=1)
            s = _scores(qi, kj)
            mask = _block_mask(qs, ks, i, j, block_q, block_kv, causal)
            m_new = jnp.maximum(m, jnp.where(mask, s, _MASKED).max(-1))
            p = jnp.exp(jnp.where(mask, s - m_new[..., None], -jnp.inf))
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, rescale * l + p.sum(-1), rescale[..., None] * acc + pv

        def step(j, carry):
            return lax.cond(live[i, j], visit, lambda j, carry: carry, j, carry)

        init = (jnp.full((B, K, G, block_q), _MASKED, jnp.float32), jnp.zeros((B, K, G, block_q), jnp.float32),
                jnp.zeros((B, K, G, block_q, H), jnp.float32))
        m, l, acc = lax.fori_loop(0, _kv_block_end(i, block_q, block_kv, n_kv, causal), step, init)
        empty = l == 0  # a row with no visible key (only padding queries): output 0, not 0/0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
        return out.astype(q.dtype), lse

    out, lse = lax.map(query_block, jnp.arange(n_q))  # [n_q, B, K, G, bq, H], [n_q, B, K, G, bq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tq, K, G, H)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_backward(causal, block_q, block_kv, residuals, d_out):
    """FlashAttention-2's backward: key blocks outside, query blocks inside; dq accumulates in fp32.

    With P = softmax(S) recomputed from the saved log-sum-exp, dV = Pᵀ dO, dP = dO Vᵀ and
    dS = P ∘ (dP - rowsum(dO ∘ O)); then dQ = dS K / sqrt(H) and dK = dSᵀ Q / sqrt(H).
    """
    q, k, v, q_seg, kv_seg, out, lse = residuals
    B, Tq, K, G, H = q.shape
    n_q, n_kv = Tq // block_q, k.shape[1] // block_kv
    live = _live_blocks(q_seg, kv_seg, block_q, block_kv)
    scale = H ** -0.5
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        kj = lax.dynamic_slice_in_dim(k, j * block_kv, block_kv, axis=1)
        vj = lax.dynamic_slice_in_dim(v, j * block_kv, block_kv, axis=1)
        ks = lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv, axis=1)

        def visit(i, carry):
            dq, dk, dv = carry
            qi = lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=1)
            doi = lax.dynamic_slice_in_dim(d_out, i * block_q, block_q, axis=1)
            qs = lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)
            di = lax.dynamic_slice_in_dim(delta, i * block_q, block_q, axis=3)
            mask = _block_mask(qs, ks, i, j, block_q, block_kv, causal)
            p = jnp.exp(jnp.where(mask, _scores(qi, kj) - lse[i][..., None], -jnp.inf))
            dv += jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(d_out.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("BTKGH,BSKH->BKGTS", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - di[..., None]) * scale
            dk += jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, i * block_q, block_q, axis=1) + dqi, i * block_q, axis=1)
            return dq, dk, dv

        def step(i, carry):
            return lax.cond(live[i, j], visit, lambda i, carry: carry, i, carry)

        zeros = jnp.zeros_like(kj, jnp.float32)  # zeros_like keeps kj's sharding
        dq, dk, dv = lax.fori_loop(_first_q_block(j, block_q, block_kv, causal), n_q, step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros_like(q, jnp.float32), jnp.arange(n_kv))
    unblock = lambda x: x.swapaxes(0, 1).reshape(k.shape)  # [n_kv, B, bk, K, H] -> [B, Tk, K, H]
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None


_flash.defvjp(_flash_forward, _flash_backward)


# --- rope and decoding ---------------------------------------------------------------------------


def rope(x, positions, theta: float):
    """Rotary embedding, rotate-half convention. x: [B, T, n, H]; positions: [B, T]."""
    H = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float32) / H))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def cached_attention(q, k, v, k_cache, v_cache, cached_valid, new_mask):
    """Attention of T new queries over the cached keys and their own, one softmax over both.

    q: [B, T, N, H]; k, v: [B, T, K, H] (this call's); k_cache, v_cache: [B, K, S, H];
    cached_valid: bool [B, S], or None for an empty cache (a prefill: nothing to read);
    new_mask: bool [B, 1, T, T] (`new_token_mask`) -> [B, T, N, H].

    Decoding's own dense attention, apart from the training kernels. The cache is only read here
    (the new keys are written once, outside the layer scan), so a step moves each cached byte
    about once rather than slicing, updating and re-stacking the whole cache per layer: 2x faster
    decoding on CPU at 1k cached tokens. B and K lead in the cache so that both matmuls batch over
    them as they lie. A prefill of T tokens holds fp32 scores [B, N, T, S + T].
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H) * jnp.asarray(H ** -0.5, q.dtype)
    lowest = jnp.finfo(jnp.float32).min
    s_new = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    s_new = jnp.where(new_mask[:, :, None], s_new, lowest)
    if cached_valid is None:
        p = jax.nn.softmax(s_new, axis=-1).astype(v.dtype)
        return jnp.einsum("BKGTS,BSKH->BTKGH", p, v).reshape(B, T, N, H)
    S = k_cache.shape[2]
    s_cache = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_cache, preferred_element_type=jnp.float32)
    s_cache = jnp.where(cached_valid[:, None, None, None, :], s_cache, lowest)
    p = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(v.dtype)
    out = (jnp.einsum("BKGTS,BKSH->BTKGH", p[..., :S], v_cache)
           + jnp.einsum("BKGTS,BSKH->BTKGH", p[..., S:], v))
    return out.reshape(B, T, N, H)


def new_token_mask(new_valid):
    """Mask of T new tokens over each other: bool [B, T] (real, not padding) -> bool [B, 1, T, T].

    Causal among real tokens; padding is never attended, except that each query sees itself, so a
    padding query's row is not fully masked (no NaN softmax). Every valid cached key precedes the
    new tokens, so the cached keys need only their `valid` bits.
    """
    T = new_valid.shape[-1]
    causal, itself = jnp.tril(jnp.ones((T, T), bool)), jnp.eye(T, dtype=bool)
    return (causal[None] & (new_valid[:, None, :] | itself[None]))[:, None]
