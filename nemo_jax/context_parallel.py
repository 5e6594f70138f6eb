"""Context parallelism: attention over one sequence split across the `sequence` mesh axis.

With `mesh.sequence: n` every activation holds T / n tokens per device. Left to XLA's
partitioner, attention all-gathers q, k and v to full length and every device computes the whole
T x T attention (n times the work, and full-length buffers). Instead, `attention` runs a
`jax.shard_map` over the sequence axis (batch and heads keep their sharding.RULES axes) with one
of two strategies, `mesh.context_parallel`:

* "ring" (default; any head count). Each device keeps its queries; the key/value blocks travel
  round the ring of the n devices (`lax.ppermute`, n - 1 hops), their segment ids and their
  tokens' original sequence indices known to every device (gathered once per call: 4 bytes a
  token). The transfer for the next hop is issued before the current block is computed, so on a
  GPU it overlaps the compute (async collective-permute). Per query
  row an online softmax is carried across hops in fp32: running max m, running sum l of
  exp(s - m), unnormalised output acc, rescaled by exp(m_old - m_new) when a block raises the max
  (as in attention.py's blockwise kernel; here the carry spans devices). GQA is native: q is
  viewed as [B, T, K, G, H] and k/v are never repeated. Query t sees key s iff s <= t in the
  ORIGINAL sequence order and both carry the same segment id (attention.py's mask).

* "ulysses" (kv heads divisible by the sequence axis, per tensor shard): all-to-all from
  [T / n, all heads] to [all T, heads / n], the same single-device kernel over the full length,
  and all-to-all back. Four all-to-alls of activations per call instead of n - 1 hops of k/v.

* "allgather": no hand-off; XLA's all-gathered keys/values (the behaviour before this module).

Load balance (zigzag). Under causality the later tokens see more keys, so a contiguous split
gives the last device n times the first one's work. The step lays the sequence out zigzag
(`to_layout`, applied inside the jitted step, `trainer.StepSetup.step_fn`): T is cut into 2n chunks
and device i holds chunks i and 2n - 1 - i, so every device has one early and one late chunk and
every hop costs every device the same two chunk-pairs of work. Every batch array (tokens, targets,
loss mask, segment ids, positions) is reordered the same way: positions are explicit per token,
so RoPE is unchanged; the loss is a sum over tokens, so its order does not matter; the kernel
masks by the original indices (`layout_indices`), so attention is unchanged. Outside a step's
`layout` context (any other caller tracing under a sequence-sharded mesh) the layout is the plain
contiguous one, and the same kernel stays exact, only unbalanced.

Backward: a `jax.custom_vjp` reverse ring, FlashAttention-2's backward per hop. The forward keeps
only q, k, v, the output and the per-row log-sum-exp (O(T / n) per device); the backward sends
the k/v blocks round the same ring, and each block's dK/dV accumulators (fp32) travel with it,
gathering every device's contribution, then take one last hop home. Autodiff through the ring
would keep every hop's carry (n copies of the fp32 [T / n, N, H] accumulator) and the per-block
scores for the backward, which is exactly the memory context parallelism is meant to remove.

Per-hop kernel. On a GPU where cuDNN's flash attention applies (Hopper or later, bf16/fp16) each
hop runs on it (`_fused_ring`, below): a fused kernel takes no per-token mask, so the hop's work is
cut into a packed causal call for what stays within a chunk and prefix-against-prefix calls, with
their log-sum-exp, for the documents that span chunks; their backward is the same reverse ring,
each call's backward given the final output and log-sum-exp. Ulysses on a GPU runs cuDNN's packed
kernel over the full length. Elsewhere (CPU, fp32) the per-hop kernel is blockwise attention in
plain JAX (lax loops, blocks that cannot meet, by segment range or causality, skipped by
`lax.cond`). Both are tested on 8 CPU devices against one device; the fused one on cuDNN's
contracts emulated in plain JAX (cudnn.Emulated), which benchmarks/gpu_step.py holds cuDNN to on a
real GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from nemo_jax import cudnn
from nemo_jax import sharding
from nemo_jax.errors import UserError

STRATEGIES = ("ring", "ulysses", "allgather")
MAX_BLOCK = 512  # tokens per query / key block of the per-hop kernel

# As in attention.py: masked scores enter the running max as this, not -inf (no -inf + inf = NaN).
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class _Setting:
    strategy: str = "ring"
    zigzag: bool = False


_SETTINGS: list[_Setting] = []


@contextlib.contextmanager
def layout(strategy: str = "ring"):
    """While tracing a step under this context, sequence-parallel attention uses `strategy` and the
    zigzag layout that `to_layout` gives the step's batch."""
    if strategy not in STRATEGIES:
        raise UserError(f"mesh.context_parallel: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    _SETTINGS.append(_Setting(strategy, zigzag=strategy != "allgather"))
    try:
        yield
    finally:
        _SETTINGS.pop()


def _setting() -> _Setting:
    return _SETTINGS[-1] if _SETTINGS else _Setting()


def _sequence_shards(mesh=None) -> int:
    mesh = mesh if mesh is not None else sharding.active_mesh()
    return 1 if mesh is None else mesh.shape[sharding.RULES["length"]]


def _zigzag(T: int, n: int) -> bool:
    return _setting().zigzag and n > 1 and T % (2 * n) == 0


def applies(length: int) -> bool:
    """Whether attention over `length` tokens, traced now, runs here: a sequence-sharded mesh that
    divides the length, and a strategy other than "allgather"."""
    n = _sequence_shards()
    return n > 1 and length % n == 0 and _setting().strategy != "allgather"


# --- the layout ------------------------------------------------------------------------------------


def zigzag_order(T: int, n: int) -> np.ndarray:
    """int [T]: the original index of the token at each position of the zigzag layout (device i's
    T / n positions hold chunks i and 2n - 1 - i of 2n equal chunks)."""
    return np.asarray(layout_indices(T, n, zigzag=True, xp=np))


def layout_indices(T: int, n: int, zigzag: bool, xp=jnp):
    """int32 [T]: the original sequence index of the token at each position of the layout (shard i
    holds positions [i T/n, (i+1) T/n)); traced with jnp, or numpy with xp=np."""
    if not zigzag:
        return xp.arange(T, dtype=xp.int32)
    c = T // (2 * n)
    chunks = xp.stack([xp.arange(n), 2 * n - 1 - xp.arange(n)], axis=1).reshape(-1)  # 0, 2n-1, 1, 2n-2, ...
    return (chunks[:, None] * c + xp.arange(c)).reshape(-1).astype(xp.int32)


def to_layout(batch: dict) -> dict:
    """The step's [B, T] batch arrays in the layout attention expects (traced, inside the step):
    zigzag on a sequence-sharded mesh under `layout`, else unchanged. A gather of the int/float
    batch arrays only (a few bytes per token), before the first layer."""
    T = next(iter(batch.values())).shape[-1]
    n = _sequence_shards()
    if not _zigzag(T, n):
        return batch
    chunks = zigzag_order(2 * n, n)  # the chunk order: 0, 2n-1, 1, 2n-2, ...

    def reorder(x):
        B = x.shape[0]
        x = jnp.take(x.reshape(B, 2 * n, T // (2 * n)), chunks, axis=1).reshape(B, T)
        return sharding.constrain(x, ("batch", "length"))

    return {k: reorder(x) for k, x in batch.items()}


# --- the sharded entry point -----------------------------------------------------------------------


def attention(q, k, v, segment_ids, *, causal: bool = True):
    """attention.attention's contract (q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T]) on the
    active mesh's sequence axis; T is in the layout of `to_layout`."""
    mesh = sharding.active_mesh()
    axis = sharding.RULES["length"]
    n = mesh.shape[axis]
    B, T, N, H = q.shape
    K = k.shape[2]
    strategy = _setting().strategy
    zigzag = _zigzag(T, n)
    q_spec = sharding.logical_to_spec(("batch", "length", "heads", "head_dim"), mesh, q.shape)
    kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), mesh, k.shape)
    if kv_spec[2] is None:  # kv heads the tensor axis cannot split: keep the query heads whole too
        q_spec = P(q_spec[0], q_spec[1], None, None)
    seg_spec = P(q_spec[0], q_spec[1])
    if q_spec[1] != axis:
        raise ValueError(f"context_parallel.attention: length {T} is not split over the sequence axis")
    heads_split = mesh.shape[q_spec[2]] if q_spec[2] else 1
    if strategy == "ulysses" and (K // heads_split) % n:
        raise UserError(f"mesh.context_parallel: ulysses splits the {K // heads_split} kv heads of a device over "
                        f"mesh.sequence = {n}, which does not divide them; use ring")

    fused = _hop_kernels(H, q.dtype) if causal else None

    def local(q, k, v, seg):
        b, t, nl, _ = q.shape
        kl = k.shape[2]
        seg = lax.all_gather(seg, axis, axis=1, tiled=True)  # every shard's segment ids [B, T]: 4 bytes a token
        if fused is not None and strategy == "ring":
            return _fused_ring(q, k, v, seg, axis, n, zigzag, fused)
        if fused is not None:
            return _fused_ulysses(q, k, v, seg, axis, n, zigzag, fused)
        q = q.reshape(b, t, kl, nl // kl, H)
        idx = layout_indices(T, n, zigzag)
        block = _block_size(T // (2 * n) if zigzag else T // n)
        if strategy == "ring":
            out = _ring(q, k, v, seg, idx, axis, n, causal, block)
        else:
            out = _ulysses(q, k, v, seg, idx, axis, causal, block)
        return out.reshape(b, t, nl, H)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids.astype(jnp.int32))


def _block_size(n_tokens: int) -> int:
    """The largest divisor of `n_tokens` up to MAX_BLOCK (blocks never straddle a zigzag chunk)."""
    return max(d for d in range(1, min(n_tokens, MAX_BLOCK) + 1) if n_tokens % d == 0)


def _ulysses(q, k, v, seg, idx, axis, causal, block):
    """q [B, T/n, K, G, H], k/v [B, T/n, K, H] -> all T for K/n kv heads, one device's attention, back."""
    to_length = functools.partial(lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    out = _ring(to_length(q), to_length(k), to_length(v), seg, idx, None, 1, causal, block)
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


# --- the ring: forward, reverse ring for the backward ----------------------------------------------
#
# One array travels per hop in each direction of work: k and v stacked ([2, B, T/n, K, H]) in the
# forward, and in the backward also the stacked dK/dV sums. The blocks' segment ids and original
# indices do not travel: every shard's are gathered once per call (`seg`, 4 bytes a token) or
# computed (`idx`), and sliced for the block at hand. XLA's GPU scheduler keeps one asynchronous
# collective in flight by default, so a second, small transfer per hop would run unoverlapped. In
# the backward the k/v transfer overlaps the compute and the dK/dV one (fp32, twice the bytes) runs
# between hops, unless XLA_FLAGS has --xla_gpu_experimental_parallel_collective_overlap_limit=2
# (then both overlap: seen in the deviceless H100 program, tests/test_context_parallel.py).


def _shift(x, axis, n):
    """Send to the next device of the ring (device i -> i + 1 mod n)."""
    return lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, seg, idx, axis, n, causal, block):
    """Per device: q [B, Tl, K, G, H] and k/v [B, Tl, K, H] of this shard; seg [B, n Tl] and idx [n Tl]:
    the segment ids and original indices of every shard's tokens in turn -> [B, Tl, K, G, H] in q's
    dtype, attending to the keys of all n shards of `axis` (n = 1: the local ones only)."""
    return _ring_forward(q, k, v, seg, idx, axis, n, causal, block)[0]


def _shard_tokens(seg, idx, shard, length):
    """(segment ids [B, Tl], original indices [Tl]) of shard `shard`'s tokens."""
    return lax.dynamic_slice_in_dim(seg, shard * length, length, 1), lax.dynamic_slice_in_dim(idx, shard * length, length)


def _ring_forward(q, k, v, seg, idx, axis, n, causal, block):
    B, Tl, K, G, H = q.shape
    nq = Tl // block
    shard = lax.axis_index(axis) if n > 1 else 0
    q_seg, q_idx = _shard_tokens(seg, idx, shard, Tl)
    state = (jnp.full((nq, B, K, G, block), _MASKED, jnp.float32), jnp.zeros((nq, B, K, G, block), jnp.float32),
             jnp.zeros((nq, B, K, G, block, H), jnp.float32))

    def hop(h, kv, state):  # the block held at hop h came from shard - h
        kv_seg, kv_idx = _shard_tokens(seg, idx, (shard - h) % n, Tl)
        return _forward_hop(q, q_seg, q_idx, kv[0], kv[1], kv_seg, kv_idx, state, causal, block)

    kv = jnp.stack([k, v])
    if n > 1:
        def body(h, carry):
            kv, state = carry
            nxt = _shift(kv, axis, n)  # issued before the compute it does not depend on: overlapped
            return nxt, hop(h, kv, state)

        kv_last, state = lax.fori_loop(0, n - 1, body, (kv, state))
    else:
        kv_last = kv
    m, l, acc = hop(n - 1, kv_last, state)  # the last block: nothing left to send
    empty = l == 0  # a row that saw no key at all (none in a real batch: every token sees itself)
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))  # [nq, B, K, G, bq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tl, K, G, H).astype(q.dtype)
    return out, (q, kv, seg, idx, out, lse)


def _ring_backward(axis, n, causal, block, residuals, d_out):
    """The reverse ring. k/v travel as in the forward; the dK/dV sums of a block (fp32) follow it one
    hop behind: a device adds its share to the sums that arrive for the block it holds and sends them
    on during its next hop's compute (so that transfer overlaps too); a last hop takes them home."""
    q, kv, seg, idx, out, lse = residuals
    Tl = q.shape[1]
    shard = lax.axis_index(axis) if n > 1 else 0
    q_seg, q_idx = _shard_tokens(seg, idx, shard, Tl)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def hop(h, kv, dq):
        kv_seg, kv_idx = _shard_tokens(seg, idx, (shard - h) % n, Tl)
        return _backward_hop(q, q_seg, q_idx, kv[0], kv[1], kv_seg, kv_idx, lse, delta, d_out, dq, causal, block)

    dq = jnp.zeros(q.shape, jnp.float32)
    if n == 1:
        dq, dkv = hop(0, kv, dq)
    else:
        send = lambda x: _shift(x, axis, n)
        nxt = send(kv)
        dq, dkv = hop(0, kv, dq)  # this shard's own block: no sums to receive yet

        def body(h, carry):
            kv, dkv, dq = carry
            nxt, arrived = send(kv), send(dkv)  # both independent of this hop's compute
            dq, mine = hop(h, kv, dq)
            return nxt, arrived + mine, dq

        kv, dkv, dq = lax.fori_loop(1, n - 1, body, (nxt, dkv, dq))
        arrived = send(dkv)
        dq, mine = hop(n - 1, kv, dq)
        dkv = send(arrived + mine)  # each block's finished sums go home
    return dq.astype(q.dtype), dkv[0].astype(kv.dtype), dkv[1].astype(kv.dtype), None, None


_ring.defvjp(_ring_forward, _ring_backward)


# --- one hop: the local queries against one key/value block ----------------------------------------


def _scores(qi, kj):
    """[B, bq, K, G, H] x [B, bk, K, H] -> fp32 [B, K, G, bq, bk], scaled by 1/sqrt(H)."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qi, kj, preferred_element_type=jnp.float32)
    return s * (qi.shape[-1] ** -0.5)


def _mask(q_seg, kv_seg, q_idx, kv_idx, causal):
    """bool [B, 1, 1, bq, bk]: same segment and, causally, key index <= query index (original order)."""
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        mask &= kv_idx[None, None, :] <= q_idx[None, :, None]
    return mask[:, None, None]


def _live_blocks(q_seg, kv_seg, q_idx, kv_idx, block, causal):
    """bool [nq, nk]: whether block pair (i, j) may hold a visible pair (segment ranges overlap and,
    causally, its earliest key is not after its latest query). Conservative; the mask is exact."""
    B = q_seg.shape[0]
    qs, ks = q_seg.reshape(B, -1, block), kv_seg.reshape(B, -1, block)
    live = ((qs.min(-1)[:, :, None] <= ks.max(-1)[:, None, :])
            & (ks.min(-1)[:, None, :] <= qs.max(-1)[:, :, None])).any(0)
    if causal:
        live &= kv_idx.reshape(-1, block).min(-1)[None, :] <= q_idx.reshape(-1, block).max(-1)[:, None]
    return live


def _live_range(live):
    """(first, one past the last) index where bool [n] `live` is true; (0, 0) where none is.

    The block loops run over this range (blocks before and after it are never visited). Its bounds
    are traced values, so the loops are while loops. With static trip counts (scans) inside the
    custom_vjp forward, itself inside the scanned layers, jax 0.10.2's partial evaluation of the layer
    scan kept every block's scores and masks, stacked, as residuals (800 GiB of temporaries per
    device for a 131072-token step), though the backward is the custom one."""
    n = live.shape[0]
    first, last = jnp.argmax(live), n - jnp.argmax(live[::-1])
    return jnp.where(live.any(), first, 0), jnp.where(live.any(), last, 0)


def _slice(x, i, block, axis=1):
    return lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _forward_hop(q, q_seg, q_idx, k, v, kv_seg, kv_idx, state, causal, block):
    """Folds one key/value block into the running (m, l, acc) of every local query block."""
    live = _live_blocks(q_seg, kv_seg, q_idx, kv_idx, block, causal)

    def query_block(xs):
        i, carry = xs[0], xs[1:]
        qi, qs, qx = _slice(q, i, block), _slice(q_seg, i, block), _slice(q_idx, i, block, 0)

        def visit(j, carry):
            m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, H]
            kj, vj = _slice(k, j, block), _slice(v, j, block)
            mask = _mask(qs, _slice(kv_seg, j, block), qx, _slice(kv_idx, j, block, 0), causal)
            s = _scores(qi, kj)
            m_new = jnp.maximum(m, jnp.where(mask, s, _MASKED).max(-1))
            p = jnp.exp(jnp.where(mask, s - m_new[..., None], -jnp.inf))
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, rescale * l + p.sum(-1), rescale[..., None] * acc + pv

        step = lambda j, carry: lax.cond(live[i, j], visit, lambda j, carry: carry, j, carry)
        return lax.fori_loop(*_live_range(live[i]), step, tuple(carry))

    return lax.map(query_block, (jnp.arange(q.shape[1] // block),) + tuple(state))


def _backward_hop(q, q_seg, q_idx, k, v, kv_seg, kv_idx, lse, delta, d_out, dq, causal, block):
    """FlashAttention-2's backward for one key/value block, with the final (all hops') log-sum-exp:
    P = exp(S - lse), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ = dS K, dK = dSᵀ Q (each / sqrt(H)).
    -> (dq accumulated, [dk, dv] of this block stacked), fp32."""
    B, Tk, K, H = k.shape
    live = _live_blocks(q_seg, kv_seg, q_idx, kv_idx, block, causal)
    scale = H ** -0.5

    def key_block(dq, j):
        kj, vj, ks, kx = _slice(k, j, block), _slice(v, j, block), _slice(kv_seg, j, block), _slice(kv_idx, j, block, 0)

        def visit(i, carry):
            dq, dk, dv = carry
            qi, doi = _slice(q, i, block), _slice(d_out, i, block)
            mask = _mask(_slice(q_seg, i, block), ks, _slice(q_idx, i, block, 0), kx, causal)
            p = jnp.exp(jnp.where(mask, _scores(qi, kj) - lse[i][..., None], -jnp.inf))
            dv += jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(d_out.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("BTKGH,BSKH->BKGTS", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - _slice(delta, i, block, 3)[..., None]) * scale
            dk += jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, block) + dqi, i * block, axis=1), dk, dv

        step = lambda i, carry: lax.cond(live[i, j], visit, lambda i, carry: carry, i, carry)
        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = lax.fori_loop(*_live_range(live[:, j]), step, (dq, zeros, zeros))
        return dq, jnp.stack([dk, dv])

    dq, dkv = lax.scan(key_block, dq, jnp.arange(Tk // block))  # dkv [nk, 2, B, bk, K, H]
    return dq, dkv.transpose(1, 2, 0, 3, 4, 5).reshape(2, B, Tk, K, H)


# --- the ring on a fused GPU kernel (cuDNN) --------------------------------------------------------
#
# A fused kernel takes no per-token mask, so each hop's work is cut into pieces it can express.
# Documents are contiguous runs of one segment id, so a query of a chunk (a zigzag chunk, or a
# shard's whole block in the contiguous layout) can see a key of an EARLIER chunk only when both
# lie in one document that spans the gap: the query is in its chunk's first run, the key in the
# other chunk's last run. Every such pair is visible. So:
#
# * every token outside its chunk's first run attends only within its own chunk: one packed,
#   causal call per device (cudnn.packed_table) on a table of the local runs without the chunks'
#   first runs, differentiated by jax's own rule;
# * each chunk's first run (a prefix of the chunk) gathers the rest: itself, causally (a prefix
#   call), and one rectangle per earlier chunk whose last run is the same document (a prefix call
#   on the key chunk reversed, so that its last run is a prefix). The rectangles' partial results
#   merge by their log-sum-exp, round the same ring as the blockwise kernel's (`_fused_prefix`, a
#   custom VJP whose backward is the reverse ring, each piece's backward given the final output
#   and log-sum-exp).
#
# With one long document the first runs are the whole chunks and every hop is two dense
# [c, c] rectangles, the balanced zigzag ring; with many short ones most of the work is the local
# packed call and the hops carry little. Both kinds of call get lengths >= 1: an empty piece is
# skipped by a `lax.cond` (no row of the batch has it), or masked per row.

_NEG = -1e30  # "no contribution yet" as a log-sum-exp: finite, so merging two of them is not NaN


def _hop_kernels(head_dim: int, dtype):
    """The fused per-hop kernels where they apply (a Hopper GPU, half precision), else None (the
    blockwise kernel). A module or namespace with cudnn's packed_table, packed, prefix_forward and
    prefix_backward."""
    return cudnn if cudnn.applies(head_dim, dtype) else None


def _chunk_order(n: int, zigzag: bool) -> np.ndarray:
    """int [n C]: the original position (in chunks) of each chunk of the layout."""
    return zigzag_order(2 * n, n) if zigzag else np.arange(n)


def _chunk_runs(seg, chunks: int):
    """Per chunk of the layout ([B, chunks] each): the segment id and length of its first run and of
    its last run."""
    B = seg.shape[0]
    x = seg.reshape(B, chunks, -1)
    c = x.shape[-1]
    first, last = x[..., 0], x[..., -1]
    differs = x != first[..., None]
    first_len = jnp.where(differs.any(-1), jnp.argmax(differs, -1), c).astype(jnp.int32)
    differs = x[..., ::-1] != last[..., None]
    last_len = jnp.where(differs.any(-1), jnp.argmax(differs, -1), c).astype(jnp.int32)
    return first, first_len, last, last_len


@jax.custom_vjp
def _keep_grad(x, keep):
    """x, with its cotangent zeroed on the tokens (axis 1) where bool [B, T] `keep` is false: the
    packed kernel's gradient there is for tokens it did not compute."""
    return x


def _keep_grad_fwd(x, keep):
    return x, keep


def _keep_grad_bwd(keep, g):
    return jnp.where(keep[:, :, None, None], g, 0), None


_keep_grad.defvjp(_keep_grad_fwd, _keep_grad_bwd)


def _fused_ring(q, k, v, seg, axis, n, zigzag, kern):
    """Per device: q [B, Tl, N, H], k/v [B, Tl, K, H] of this shard, seg [B, n Tl] every shard's
    segment ids (layout order) -> [B, Tl, N, H], causal attention over all n shards."""
    B, Tl, N, H = q.shape
    C = 2 if zigzag else 1
    c = Tl // C
    shard = lax.axis_index(axis)
    local_seg = lax.dynamic_slice_in_dim(seg, shard * Tl, Tl, 1)
    runs = _chunk_runs(seg, n * C)
    first_len = lax.dynamic_slice_in_dim(runs[1], shard * C, C, 1)  # [B, C]: this shard's chunks
    in_chunk = jnp.arange(Tl) % c
    prefix = in_chunk[None, :] < jnp.repeat(first_len, c, axis=1)  # [B, Tl]: tokens in a first run

    # the rest: one packed causal call on the local runs other than the chunks' first ones
    starts = jnp.concatenate([jnp.ones((B, 1), bool), local_seg[:, 1:] != local_seg[:, :-1]], axis=1)
    starts |= (in_chunk == 0)[None, :]
    lengths, offsets, kept = cudnn.run_table(starts, ~prefix, cudnn.MAX_RUNS + C)

    def rest(q, k, v):
        q, k, v = (_keep_grad(x, ~prefix) for x in (q, k, v))
        out = kern.packed_table(q, k, v, lengths, offsets, True)
        return jnp.where((kept <= cudnn.MAX_RUNS + C)[:, None, None, None], out, jnp.nan).astype(q.dtype)

    rest_out = lax.cond((lengths > 0).any(), rest, lambda q, k, v: jnp.zeros_like(q), q, k, v)
    first_out = _fused_prefix(q, k, v, runs, axis, n, zigzag, kern)
    return jnp.where(prefix[:, :, None, None], first_out, rest_out)


def _pieces(runs, order, shard, src, own: bool, C: int):
    """The pieces of one hop: for local query chunk a and chunk b of shard `src`'s block, a tuple
    (a, b, causal, run, q_len [B], kv_len [B], rows [B]) where `run` says whether any row has it."""
    first, first_len, last, last_len = runs
    out = []
    for a in range(C):
        gq = shard * C + a
        for b in range(C):
            gk = src * C + b
            if own and a == b:  # the first run against itself, causally
                ln = first_len[:, gq]
                out.append((a, b, True, jnp.asarray(True), ln, ln, jnp.ones_like(ln, bool)))
                continue
            rows = (first[:, gq] == last[:, gk]) & (jnp.asarray(order)[gk] < jnp.asarray(order)[gq])
            out.append((a, b, False, rows.any(), first_len[:, gq], last_len[:, gk], rows))
    return out


def _key_chunk(x, b, c, causal):
    """Chunk b of a key/value block; a rectangle's reversed, so that its last run is a prefix."""
    x = x[:, b * c:(b + 1) * c]
    return x if causal else x[:, ::-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_prefix(q, k, v, runs, axis, n, zigzag, kern):
    """Attention of each local chunk's first run over every shard (rows outside it are 0)."""
    return _fused_prefix_forward(q, k, v, runs, axis, n, zigzag, kern)[0]


def _fused_prefix_forward(q, k, v, runs, axis, n, zigzag, kern):
    B, Tl, N, H = q.shape
    C = 2 if zigzag else 1
    c = Tl // C
    order = _chunk_order(n, zigzag)
    shard = lax.axis_index(axis)
    q_chunks = [q[:, a * c:(a + 1) * c] for a in range(C)]

    def fold(src, own, kv, state):
        state = list(state)
        for a, b, causal, run, q_len, kv_len, rows in _pieces(runs, order, shard, src, own, C):
            kb, vb = _key_chunk(kv[0], b, c, causal), _key_chunk(kv[1], b, c, causal)

            def merge(st, q_len=q_len, kv_len=kv_len, rows=rows, kb=kb, vb=vb, a=a, causal=causal):
                acc, lse = st
                o, l = kern.prefix_forward(q_chunks[a], kb, vb, jnp.maximum(q_len, 1), jnp.maximum(kv_len, 1),
                                           causal)
                live = rows[:, None] & (jnp.arange(c)[None, :] < q_len[:, None])  # [B, c]
                l = jnp.where(live[:, None, :], l, _NEG)
                new = jnp.logaddexp(lse, l)
                w_old = jnp.exp(lse - new).transpose(0, 2, 1)[..., None]
                w_new = jnp.exp(l - new).transpose(0, 2, 1)[..., None]
                o = jnp.where(live[:, :, None, None], o.astype(jnp.float32), 0.0)
                return acc * w_old + o * w_new, new

            state[a] = lax.cond(run, merge, lambda st: st, state[a])
        return tuple(state)

    state = tuple((jnp.zeros((B, c, N, H), jnp.float32), jnp.full((B, N, c), _NEG, jnp.float32))
                  for _ in range(C))
    kv = jnp.stack([k, v])
    nxt = _shift(kv, axis, n)  # issued before the own block's compute: overlapped
    state = fold(shard, True, kv, state)

    def body(h, carry):
        kv, state = carry
        nxt = _shift(kv, axis, n)
        return nxt, fold((shard - h) % n, False, kv, state)

    kv_last, state = lax.fori_loop(1, n - 1, body, (nxt, state))
    state = fold((shard - (n - 1)) % n, False, kv_last, state)
    out = jnp.concatenate([acc for acc, _ in state], axis=1).astype(q.dtype)
    lse = tuple(l for _, l in state)
    return out, (q, kv, runs, out, lse)


def _fused_prefix_backward(axis, n, zigzag, kern, residuals, d_out):
    q, kv, runs, out, lse = residuals
    B, Tl, N, H = q.shape
    C = 2 if zigzag else 1
    c = Tl // C
    order = _chunk_order(n, zigzag)
    shard = lax.axis_index(axis)
    chunk = lambda x, a: x[:, a * c:(a + 1) * c]
    q_chunks, o_chunks, do_chunks = ([chunk(x, a) for a in range(C)] for x in (q, out, d_out))

    def hop(src, own, kv, dq):
        dq, dkv = list(dq), [[jnp.zeros((B, c) + kv.shape[3:], jnp.float32) for _ in range(C)] for _ in range(2)]
        for a, b, causal, run, q_len, kv_len, rows in _pieces(runs, order, shard, src, own, C):
            kb, vb = _key_chunk(kv[0], b, c, causal), _key_chunk(kv[1], b, c, causal)

            def grads(q_len=q_len, kv_len=kv_len, rows=rows, kb=kb, vb=vb, a=a, causal=causal):
                gq, gk, gv = kern.prefix_backward(q_chunks[a], kb, vb, o_chunks[a], lse[a], do_chunks[a],
                                                  jnp.maximum(q_len, 1), jnp.maximum(kv_len, 1), causal)
                live_q = rows[:, None] & (jnp.arange(c)[None, :] < q_len[:, None])
                live_k = rows[:, None] & (jnp.arange(c)[None, :] < kv_len[:, None])
                keep = lambda g, live: jnp.where(live[:, :, None, None], g.astype(jnp.float32), 0.0)
                gk, gv = keep(gk, live_k), keep(gv, live_k)
                if not causal:  # back from the reversed chunk
                    gk, gv = gk[:, ::-1], gv[:, ::-1]
                return keep(gq, live_q), gk, gv

            zeros = lambda: (jnp.zeros(q_chunks[a].shape, jnp.float32),) + (jnp.zeros(kb.shape, jnp.float32),) * 2
            gq, gk, gv = lax.cond(run, grads, zeros)
            dq[a] = dq[a] + gq
            dkv[0][b], dkv[1][b] = dkv[0][b] + gk, dkv[1][b] + gv
        return tuple(dq), jnp.stack([jnp.concatenate(d, axis=1) for d in dkv])

    send = lambda x: _shift(x, axis, n)
    dq = tuple(jnp.zeros(x.shape, jnp.float32) for x in q_chunks)
    nxt = send(kv)
    dq, dkv = hop(shard, True, kv, dq)  # the own block: no sums to receive yet

    def body(h, carry):
        kv, dkv, dq = carry
        nxt, arrived = send(kv), send(dkv)
        dq, mine = hop((shard - h) % n, False, kv, dq)
        return nxt, arrived + mine, dq

    kv, dkv, dq = lax.fori_loop(1, n - 1, body, (nxt, dkv, dq))
    arrived = send(dkv)
    dq, mine = hop((shard - (n - 1)) % n, False, kv, dq)
    dkv = send(arrived + mine)  # each block's finished sums go home
    dq = jnp.concatenate(dq, axis=1)
    return dq.astype(q.dtype), dkv[0].astype(kv.dtype), dkv[1].astype(kv.dtype), None


_fused_prefix.defvjp(_fused_prefix_forward, _fused_prefix_backward)


def _fused_ulysses(q, k, v, seg, axis, n, zigzag, kern):
    """Ulysses on the fused kernel: all T for a share of the heads, put back in the original order
    (the kernel's causal mask is by position), one packed call, and back."""
    to_length = functools.partial(lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    T = seg.shape[1]
    idx = layout_indices(T, n, zigzag, xp=np)
    inverse = np.argsort(idx)
    q, k, v = (to_length(x)[:, inverse] for x in (q, k, v))
    out = kern.packed(q, k, v, seg[:, inverse], True)[:, idx]
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)
