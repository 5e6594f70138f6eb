"""Causal GQA attention over packed documents, and the choice of kernel.

    attention(q [B, T, N, H], k, v [B, T, K, H], segment_ids [B, T]) -> [B, T, N, H]

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
  layout, which takes the documents of each row natively: per row, a table of the contiguous runs
  of equal segment ids (offsets and lengths, `segment_table`), and a causal mask within each run.
  No [T, T] mask or bias exists anywhere, forward or backward. The table has a fixed size
  (config.MAX_DOCUMENTS_PER_ROW documents + the padding run), which the data packer respects; a
  row with more runs than that comes out as NaN rather than silently attending across documents.
  jax's public `dot_product_attention(implementation="cudnn")` cannot express packed documents
  except through a dense mask that becomes an O(T²) bias (and a bias gradient): its
  `query_seq_lengths` describe one valid prefix per row, so using them (or `is_causal` alone) on
  packed rows would let documents see each other (MaxText's cudnn_flash_jax ignores segment ids
  this way, maxtext issue #4476). Two fixes to jax 0.10.2's wrapper are applied here, see
  `_cudnn_wrapper`: its GQA key offsets (jax PR #39521), and its compute-capability guard, which
  asks the local GPU and so refuses a deviceless (AOT) compile for an H100.

`implementation="auto"` picks from the per-device shapes of the program being built
(backend.platform(): a deviceless H100 compile counts as a GPU): "cudnn" on a GPU whenever it
applies, else "xla" while T·T <= XLA_MAX_SCORES, else "blockwise".
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nemo_jax import context_parallel
from nemo_jax.backend import platform
from nemo_jax.config import MAX_DOCUMENTS_PER_ROW

Implementation = Literal["auto", "xla", "blockwise", "cudnn"]

XLA_MAX_SCORES = 1024 * 1024  # "auto" uses the dense path up to T·T of this; on CPU blockwise wins from T ~ 1024
MAX_RUNS = MAX_DOCUMENTS_PER_ROW + 1  # entries of the cuDNN packed layout's table: the documents and the padding

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
    if cudnn_applies(head_dim, dtype):
        return "cudnn"
    if length * length <= XLA_MAX_SCORES:
        return "xla"
    return "blockwise"


def cudnn_applies(head_dim: int, dtype) -> bool:
    """cuDNN's packed flash attention: a Hopper-or-later GPU, half precision, head_dim <= 256."""
    if platform() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    return head_dim % 8 == 0 and head_dim <= 256 and _compute_capability() >= (9, 0)


def _compute_capability() -> tuple[int, ...]:
    """Of the GPU the program is built for: the traced mesh's devices (a deviceless compile has no
    local GPU), else the local one."""
    from nemo_jax.sharding import active_mesh

    mesh = active_mesh()
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split("."))


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
        return _per_device(functools.partial(_cudnn_packed, causal=causal), q, k, v, segment_ids)
    if kind == "blockwise":
        return _blockwise(q, k, v, segment_ids, causal, min(block_q, T), min(block_kv, T))
    raise ValueError(f"attention: unknown implementation {implementation!r}; "
                     "expected 'auto', 'xla', 'blockwise' or 'cudnn'")


def segment_table(segment_ids, max_runs: int = MAX_RUNS):
    """cuDNN's packed layout of rows of contiguous segments: (lengths [B, M], offsets [B, M + 1]).

    Entry j of a row is its j-th run of equal segment ids (a document, or the padding at the end):
    its length and its first index; unused entries are -1, as jax's wrapper expects. Runs beyond
    `max_runs` are not in the table (`attention` turns their rows into NaN).
    """
    B, T = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # [B, T]: the run each token is in
    n_runs = run[:, -1] + 1
    lengths = jnp.sum(run[:, :, None] == jnp.arange(max_runs, dtype=jnp.int32), axis=1, dtype=jnp.int32)
    offsets = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths
    used = jnp.arange(max_runs) < n_runs[:, None]
    lengths, offsets = jnp.where(used, lengths, -1), jnp.where(used, offsets, -1)
    return lengths, jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1), n_runs


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


def _cudnn_packed(q, k, v, segment_ids, causal):
    fa = _cudnn_wrapper()
    lengths, offsets, n_runs = segment_table(segment_ids.astype(jnp.int32))
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    out = fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                   kv_offsets=offsets, scale=q.shape[-1] ** -0.5, mask_type=mask)
    # A row whose documents overflow the table would have tokens outside every run: NaN, not wrong.
    return jnp.where((n_runs <= MAX_RUNS)[:, None, None, None], out, jnp.nan).astype(q.dtype)


@functools.cache
def _cudnn_wrapper():
    """jax 0.10.2's cuDNN wrapper module, mended once (its checks also run later, while jax
    differentiates and rematerialises the traced step, so the fixes stay in place):

    * `_fix_seqlen_offsets` turns per-row token offsets into element offsets with the *query's*
      per-token stride N·H for the keys too; under GQA the keys' stride is K·H, so the key offsets
      point N/K times too far and attention silently reads other tokens' keys (jax PR #39521, found
      with MaxText on a 32/8-head model). Replaced by the same function with the keys' stride,
      where the installed jax still has the bug (probed, not assumed from the version).
    * `check_compute_capability` asks the *local* GPU; a deviceless compile has none, so it would
      refuse the packed layout ("requires Hopper"). While a mesh is being traced for, it is
      answered for that mesh's devices; otherwise jax's own check runs.
    """
    from jax._src.cudnn import fused_attention_stablehlo as fa

    if _offsets_use_query_stride(fa):
        fa._fix_seqlen_offsets = functools.partial(_fixed_seqlen_offsets, fa._fix_seqlen_offsets)
    local_check = fa.check_compute_capability

    def check_compute_capability(capability: str) -> bool:
        from nemo_jax.sharding import active_mesh

        if active_mesh() is None:
            return local_check(capability)
        return _compute_capability() >= tuple(int(x) for x in capability.split("."))

    fa.check_compute_capability = check_compute_capability
    return fa


def _offsets_use_query_stride(fa) -> bool:
    """Whether the installed jax scales the key offsets by the query's stride (the GQA bug)."""
    with jax.ensure_compile_time_eval():  # called while tracing: compute, do not stage
        q, k = jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 1, 8))  # 4 query heads, 1 kv head
        seq, off = jnp.array([[2, 2]], jnp.int32), jnp.array([[0, 2, -1]], jnp.int32)
        kv_off = fa._fix_seqlen_offsets(seq, seq, off, off, q, k)[3]
        return int(kv_off[0, 1]) == 2 * 4 * 8  # 2 tokens x N x H; the keys' stride gives 2 x K x H


def _fixed_seqlen_offsets(original, q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
    """jax's own conversion, with the key offsets rescaled from the query's stride to the keys'."""
    q_seqlen, kv_seqlen, q_offsets, kv_offsets = original(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
    N, K = query.shape[2], key.shape[2]
    if q_offsets.ndim == 2 and q_offsets.shape[1] > 2 and N != K:  # converted: element offsets, N·H apart
        kv_offsets = jnp.where(kv_offsets >= 0, kv_offsets // N * K, kv_offsets)
    return q_seqlen, kv_seqlen, q_offsets, kv_offsets


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
