"""cuDNN's fused flash attention (GPU, bf16/fp16, Hopper or later), as attention.py and
context_parallel.py call it.

Two forms:

* `packed`: the *packed* layout, which takes the documents of each row natively: per row, a table
  of the contiguous runs of equal segment ids (offsets and lengths, `segment_table`), and a causal
  mask within each run. No [T, T] mask or bias exists anywhere, forward or backward. The table has
  a fixed size (config.MAX_DOCUMENTS_PER_ROW documents + the padding run), which the data packer
  respects; a row with more runs than that comes out as NaN rather than silently attending across
  documents. Differentiated by jax's own rule.
  jax's public `dot_product_attention(implementation="cudnn")` cannot express packed documents
  except through a dense mask that becomes an O(T²) bias (and a bias gradient): its
  `query_seq_lengths` describe one valid prefix per row, so using them (or `is_causal` alone) on
  packed rows would let documents see each other (MaxText's cudnn_flash_jax ignores segment ids
  this way, maxtext issue #4476).

* `prefix_forward` / `prefix_backward`: one valid prefix of queries against one valid prefix of
  keys per row (the padding layout), optionally causal, with the per-row log-sum-exp out of the
  forward and *given* to the backward. Ring attention needs both halves separately: a hop's
  partial result is merged with the others' by its log-sum-exp, and each hop's backward must use
  the final (all hops') log-sum-exp and output (FlashAttention-2's backward), which jax's own rule
  for this kernel cannot be given.

Two fixes to jax 0.10.2's wrapper are applied, see `wrapper`: its GQA key offsets (jax PR
#39521), and its compute-capability guard, which asks the local GPU and so refuses a deviceless
(AOT) compile for an H100.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemo_jax.backend import platform
from nemo_jax.config import MAX_DOCUMENTS_PER_ROW

MAX_RUNS = MAX_DOCUMENTS_PER_ROW + 1  # entries of the packed layout's table: the documents and the padding


def applies(head_dim: int, dtype) -> bool:
    """cuDNN's flash attention: a Hopper-or-later GPU, half precision, head_dim <= 256."""
    if platform() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    return head_dim % 8 == 0 and head_dim <= 256 and compute_capability() >= (9, 0)


def compute_capability() -> tuple[int, ...]:
    """Of the GPU the program is built for: the traced mesh's devices (a deviceless compile has no
    local GPU), else the local one."""
    from nemo_jax.sharding import active_mesh

    mesh = active_mesh()
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split("."))


def segment_table(segment_ids, max_runs: int = MAX_RUNS):
    """cuDNN's packed layout of rows of contiguous segments: (lengths [B, M], offsets [B, M + 1]).

    Entry j of a row is its j-th run of equal segment ids (a document, or the padding at the end):
    its length and its first index; unused entries are -1, as jax's wrapper expects. Runs beyond
    `max_runs` are not in the table (`packed` turns their rows into NaN).
    """
    B, T = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return run_table(starts, jnp.ones((B, T), bool), max_runs)


def run_table(starts, kept, max_runs: int):
    """The packed table of the runs that begin where bool [B, T] `starts` is set, keeping only the
    runs whose first token is `kept` (the others are left out: their tokens are in no run).
    -> (lengths [B, M], offsets [B, M + 1], number of runs kept [B])."""
    B, T = starts.shape
    index = jnp.arange(T, dtype=jnp.int32)
    later = jnp.where(starts, index, T)
    later = jax.lax.cummin(later[:, ::-1], axis=1)[:, ::-1]  # the first start at or after t
    next_start = jnp.concatenate([later[:, 1:], jnp.full((B, 1), T, jnp.int32)], axis=1)
    begins = starts & kept
    offsets = jax.vmap(lambda b: jnp.nonzero(b, size=max_runs, fill_value=-1)[0])(begins).astype(jnp.int32)
    lengths = jnp.where(offsets >= 0, jnp.take_along_axis(next_start, jnp.maximum(offsets, 0), axis=1) - offsets, -1)
    return lengths, jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1), begins.sum(1, dtype=jnp.int32)


def packed(q, k, v, segment_ids, causal: bool):
    """q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T]: each run of equal ids attends within
    itself (causally) -> [B, T, N, H] in q's dtype; NaN rows where a row overflows the table."""
    lengths, offsets, n_runs = segment_table(segment_ids.astype(jnp.int32))
    out = packed_table(q, k, v, lengths, offsets, causal)
    return jnp.where((n_runs <= MAX_RUNS)[:, None, None, None], out, jnp.nan).astype(q.dtype)


def packed_table(q, k, v, lengths, offsets, causal: bool):
    """The packed kernel on a given table (`segment_table`, `run_table`); tokens in no run of the
    table are not computed (their rows of the output are undefined)."""
    fa = wrapper()
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                    kv_offsets=offsets, scale=q.shape[-1] ** -0.5, mask_type=mask)


def _prefix_args(q, q_len, kv_len, causal):
    fa = wrapper()
    unused = jnp.zeros(0, q.dtype)
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    args = (unused, q_len.astype(jnp.int32), kv_len.astype(jnp.int32), unused, unused, unused, unused)
    params = dict(scale=q.shape[-1] ** -0.5, seed=42, dropout_rate=0.0, variadic_args=(False, False),
                  mask_type=mask, layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    return fa, args, params


def prefix_forward(q, k, v, q_len, kv_len, causal: bool):
    """q [B, T, N, H] against k/v [B, S, K, H], row b using its first q_len[b] queries and first
    kv_len[b] keys (both >= 1), causally (query t sees keys <= t) or not.
    -> (output [B, T, N, H] in q's dtype, log-sum-exp of the scaled scores fp32 [B, N, T]);
    rows at or past q_len are undefined."""
    fa, (bias, ql, kl, qo, ko, pk, pv), params = _prefix_args(q, q_len, kv_len, causal)
    fa.check_is_flash_attention(q, k, v, params["layout"], fa.check_cudnn_version(), False, True)
    out, lse = fa._dot_product_attention_fwd_p_wrapper.bind(q, k, v, bias, ql, kl, qo, ko, pk, pv, **params,
                                                             is_training=True)
    return out, lse


def prefix_backward(q, k, v, out, lse, d_out, q_len, kv_len, causal: bool):
    """FlashAttention-2's backward of `prefix_forward` with a given output and log-sum-exp (those of
    the whole attention when this call is one part of it) -> (dq, dk, dv) in the inputs' dtypes;
    rows at or past the prefixes are undefined."""
    fa, (bias, ql, kl, qo, ko, pk, pv), params = _prefix_args(q, q_len, kv_len, causal)
    dq, dk, dv = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, bias, ql, kl, qo, ko, pk, pv, lse, out.astype(q.dtype), d_out.astype(q.dtype), **params)
    return dq, dk, dv


class Emulated:
    """This module's kernels' contracts in dense plain JAX, any backend and dtype: the fused ring's
    CPU test runs on them (tests/workers/context_parallel_checks.py), and the real-GPU check
    (benchmarks/gpu_step.py) holds cuDNN to them. The rows the real kernels leave undefined come
    out NaN here, so a caller that used them would fail its test."""

    @staticmethod
    def _scores(q, k, mask):
        G = q.shape[2] // k.shape[2]
        s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, G, axis=2)) * q.shape[-1] ** -0.5
        return jnp.where(mask, s, -1e30)

    @staticmethod
    def _prefix_mask(T, S, q_len, kv_len, causal):
        t, u = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
        mask = (u < kv_len[:, None, None]) & (t < q_len[:, None, None])
        if causal:
            mask &= u <= t
        return mask[:, None]  # [B, 1, T, S]

    @classmethod
    def prefix_forward(cls, q, k, v, q_len, kv_len, causal):
        T, G = q.shape[1], q.shape[2] // k.shape[2]
        s = cls._scores(q, k, cls._prefix_mask(T, k.shape[1], q_len, kv_len, causal))
        lse = jax.nn.logsumexp(s, -1)
        out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), jnp.repeat(v, G, axis=2))
        rows = jnp.arange(T)[None, :] < q_len[:, None]
        return jnp.where(rows[:, :, None, None], out, jnp.nan), jnp.where(rows[:, None, :], lse, jnp.nan)

    @classmethod
    def prefix_backward(cls, q, k, v, out, lse, d_out, q_len, kv_len, causal):
        B, T, N, H = q.shape
        S, K = k.shape[1], k.shape[2]
        G = N // K
        mask = cls._prefix_mask(T, S, q_len, kv_len, causal)
        q_rows = (jnp.arange(T)[None, :] < q_len[:, None])[:, :, None, None]
        # the kernel reads only the rows inside the prefixes of what it is given
        out, d_out = jnp.where(q_rows, out, 0), jnp.where(q_rows, d_out, 0)
        lse = jnp.where(q_rows[:, :, :, 0].transpose(0, 2, 1), lse, 0)
        p = jnp.where(mask, jnp.exp(cls._scores(q, k, mask) - lse[..., None]), 0.0)
        kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        dv = jnp.einsum("bnts,btnh->bsnh", p, d_out)
        dp = jnp.einsum("btnh,bsnh->bnts", d_out, vv)
        delta = jnp.einsum("btnh,btnh->bnt", d_out, out)
        ds = p * (dp - delta[..., None]) * H ** -0.5
        dq = jnp.einsum("bnts,bsnh->btnh", ds, kk)
        dk = jnp.einsum("bnts,btnh->bsnh", ds, q)
        group = lambda x: x.reshape(B, S, K, G, H).sum(3)
        kv_rows = (jnp.arange(S)[None, :] < kv_len[:, None])[:, :, None, None]
        return (jnp.where(q_rows, dq, jnp.nan), jnp.where(kv_rows, group(dk), jnp.nan),
                jnp.where(kv_rows, group(dv), jnp.nan))

    @classmethod
    def packed_table(cls, q, k, v, lengths, offsets, causal):
        T = q.shape[1]
        t = jnp.arange(T)[None, :, None]
        start, length = offsets[:, None, :-1], lengths[:, None, :]
        inside = (length > 0) & (t >= start) & (t < start + length)  # [B, T, M]
        run = jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1)  # [B, T]
        mask = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
        if causal:
            mask &= jnp.tril(jnp.ones((T, T), bool))
        out = cls._dense(q, k, v, mask[:, None])
        return jnp.where((run >= 0)[:, :, None, None], out, jnp.nan)

    @classmethod
    def packed(cls, q, k, v, segment_ids, causal):
        T = q.shape[1]
        mask = segment_ids[:, :, None] == segment_ids[:, None, :]
        if causal:
            mask &= jnp.tril(jnp.ones((T, T), bool))
        return cls._dense(q, k, v, mask[:, None])

    @classmethod
    def _dense(cls, q, k, v, mask):
        G = q.shape[2] // k.shape[2]
        p = jax.nn.softmax(cls._scores(q, k, mask), -1)
        return jnp.einsum("bnts,bsnh->btnh", p, jnp.repeat(v, G, axis=2))



@functools.cache
def wrapper():
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
        return compute_capability() >= tuple(int(x) for x in capability.split("."))

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
