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
(`to_layout`, applied inside the jitted step, `trainer.Layout.step_fn`): T is cut into 2n chunks
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

Per-hop kernel: blockwise in plain JAX on every backend (lax loops, blocks that cannot meet,
by segment range or causality, skipped by `lax.cond`). On a GPU the per-hop compute should be a
fused attention kernel that returns the log-sum-exp (cuDNN), which is not wired here.
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

from nemo_jax import sharding as S
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
    mesh = mesh if mesh is not None else S.active_mesh()
    return 1 if mesh is None else mesh.shape[S.RULES["length"]]


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
        return S.constrain(x, ("batch", "length"))

    return {k: reorder(x) for k, x in batch.items()}


# --- the sharded entry point -----------------------------------------------------------------------


def attention(q, k, v, segment_ids, *, causal: bool = True):
    """attention.attention's contract (q [B, T, N, H], k/v [B, T, K, H], segment_ids [B, T]) on the
    active mesh's sequence axis; T is in the layout of `to_layout`."""
    mesh = S.active_mesh()
    axis = S.RULES["length"]
    n = mesh.shape[axis]
    B, T, N, H = q.shape
    K = k.shape[2]
    strategy = _setting().strategy
    zigzag = _zigzag(T, n)
    q_spec = S.logical_to_spec(("batch", "length", "heads", "head_dim"), mesh, q.shape)
    kv_spec = S.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), mesh, k.shape)
    if kv_spec[2] is None:  # kv heads the tensor axis cannot split: keep the query heads whole too
        q_spec = P(q_spec[0], q_spec[1], None, None)
    seg_spec = P(q_spec[0], q_spec[1])
    if q_spec[1] != axis:
        raise ValueError(f"context_parallel.attention: length {T} is not split over the sequence axis")
    heads_split = mesh.shape[q_spec[2]] if q_spec[2] else 1
    if strategy == "ulysses" and (K // heads_split) % n:
        raise UserError(f"mesh.context_parallel: ulysses splits the {K // heads_split} kv heads of a device over "
                        f"mesh.sequence = {n}, which does not divide them; use ring")

    def local(q, k, v, seg):
        b, t, nl, _ = q.shape
        kl = k.shape[2]
        q = q.reshape(b, t, kl, nl // kl, H)
        idx = layout_indices(T, n, zigzag)
        seg = lax.all_gather(seg, axis, axis=1, tiled=True)  # every shard's segment ids [B, T]: 4 bytes a token
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
    nk = k.shape[1] // block
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
    nq = q.shape[1] // block
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
