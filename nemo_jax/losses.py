"""Next-token cross-entropy computed in chunks over the sequence.

The LM head turns [B, T, D] hidden states into [B, T, V] logits; at V = 131072 and T = 8192 that is
4 GiB per sequence in fp32, more than the rest of the step. Scanning over chunks of the sequence
keeps only [B, chunk, V] alive, forward and backward.

Under differentiation the head and the loss are one fused custom VJP: each chunk's forward also
computes d loss / d logits = mask * (softmax - onehot) while its logits are live, and turns it at
once into the chunk's hidden-state gradient (dlogits . head^T) and its share of the head gradient
(h^T . dlogits, accumulated over chunks). Only those (the size of the hidden states and of the head)
are kept for the backward pass, so the logits are computed once instead of being rematerialised,
and the target gather never becomes a scatter into a [B, chunk, V] gradient. The backward pass
scales them by the incoming cotangent. Without differentiation (evaluation) only the loss is computed.

`chunked_kl_sum` is the same machinery for distillation (FP8 quantisation-aware distillation): the
target is the teacher's next-token distribution instead of the one-hot target, so d loss / d logits
= mask * (softmax - teacher probabilities), and the teacher's logits are computed chunk by chunk
alongside the student's.

`chunked_token_logp` gives each position's log p(target) itself, without gradient, chunk by chunk
as well: DPO (train_loop.dpo_sums) sums them per sequence, and its gradient then comes from
`chunked_nll_sum` with per-token weights (the derivative of the pair loss with respect to the
pair's log-probability), so the fused head VJP above serves it unchanged.

Losses are returned as sums with their token counts, so gradient accumulation and data-parallel
shards combine exactly (token-weighted), whatever the number of trained tokens per micro-batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemo_jax import backend


def chunked_nll_sum(hidden, head, targets, mask, chunk: int, dtype=jnp.float32):
    """Sum over masked positions of -log p(target). hidden [B,T,D], head [D,V], targets/mask [B,T]."""
    T = hidden.shape[1]
    chunk = max(1, min(chunk, T))
    n = -(-T // chunk)
    hs = _chunks(hidden, chunk, n)  # [n, B, c, D]
    ts = _chunks(targets.astype(jnp.int32), chunk, n)
    ms = _chunks(mask.astype(jnp.float32), chunk, n)
    return _nll_sum(jnp.dtype(dtype), hs, head, ts, ms)


def _chunks(x, chunk: int, n: int):
    """[B, T, ...] -> [n, B, chunk, ...], T padded with zeros to n * chunk."""
    B, T = x.shape[:2]
    pad = n * chunk - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((B, n, chunk) + x.shape[2:]).swapaxes(0, 1)


def chunked_kl_sum(hidden, head, teacher_hidden, teacher_head, mask, chunk: int, dtype=jnp.float32):
    """Sum over masked positions of KL(teacher || student) between next-token distributions.

    hidden/teacher_hidden [B, T, D], head/teacher_head [D, V], mask [B, T]. The teacher gets no
    gradient. Padding chunks carry mask 0 and add nothing.
    """
    T = hidden.shape[1]
    chunk = max(1, min(chunk, T))
    n = -(-T // chunk)
    hs, ths = _chunks(hidden, chunk, n), _chunks(teacher_hidden, chunk, n)
    ms = _chunks(mask.astype(jnp.float32), chunk, n)
    return _kl_sum(jnp.dtype(dtype), hs, head, jax.lax.stop_gradient(ths), jax.lax.stop_gradient(teacher_head), ms)


def _logits(h, head, dtype):
    return jnp.einsum("BcD,DV->BcV", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


def _head_grads(dlogits, h_c, head_c):
    """(d hidden [B, c, D], d head [D, V]), fp32, from fp32 d loss / d logits [B, c, V]; the caller
    rounds to the compute dtype after scaling.

    On a GPU: GEMMs in the compute dtype with fp32 accumulation, as autodiff of the logits' matmul
    would run them (dlogits rounded to the compute dtype, the head and the hidden states as they
    are: no fp32 [D, V] copy of the head). On the CPU, fp32 GEMMs on upcast operands (XLA:CPU
    upcasts bf16 dots to fp32 anyway), tuned as below.
    """
    B, c, D = h_c.shape
    if not backend.is_cpu():
        dl = dlogits.astype(h_c.dtype)
        dh = jnp.einsum("BcV,DV->BcD", dl, head_c, preferred_element_type=jnp.float32)
        dhead = jnp.einsum("BcD,BcV->DV", h_c, dl, preferred_element_type=jnp.float32)
        return dh, dhead
    dh = jnp.einsum("BcV,DV->BcD", dlogits, head_c.astype(jnp.float32))
    h2 = h_c.astype(jnp.float32).reshape(B * c, D)
    # XLA:CPU runs a dot that contracts the lhs's leading dim (h^T . dlogits) on Eigen, at about
    # half the speed of its YNNPACK dot for this [D, V] shape (benchmarks/train_step.py); the
    # barrier keeps the transpose a [D, B*c] copy (~1/V of the matmul's work) instead of being
    # folded back into the dot.
    dhead = jax.lax.optimization_barrier(h2.T) @ dlogits.reshape(B * c, -1)
    return dh, dhead


def _chunk_nll(logits, t):
    """Per-token -log p(target) [B, c] and the log-partition [B, c] of fp32 logits [B, c, V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return lse - tgt, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nll_sum(dtype, hs, head, ts, ms):
    def body(total, xs):
        h, t, m = xs
        nll, _ = _chunk_nll(_logits(h, head, dtype), t)
        return total + jnp.sum(nll * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total


def _nll_sum_fwd(dtype, hs, head, ts, ms):
    head_c = head.astype(dtype)

    def chunk(h, t, m):
        h_c = h.astype(dtype)
        logits = _logits(h_c, head_c, dtype)
        nll, lse = _chunk_nll(logits, t)
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]
        dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * m[..., None]
        dh, dhead = _head_grads(dlogits, h_c, head_c)
        return jnp.sum(nll * m), dhead, dh, nll

    # The first chunk outside the loop: its head gradient starts the fp32 sum (no zero-filled
    # [D, V] accumulator), and a sequence that fits one chunk needs no loop at all.
    total, dhead, dh, nll = chunk(hs[0], ts[0], ms[0])
    dhs, nlls = dh[None], nll[None]
    if hs.shape[0] > 1:
        def body(carry, xs):
            total, dhead = carry
            t_c, dhead_c, dh, nll = chunk(*xs)
            return (total + t_c, dhead + dhead_c), (dh, nll)

        (total, dhead), (rest_dh, rest_nll) = jax.lax.scan(body, (total, dhead), (hs[1:], ts[1:], ms[1:]))
        dhs, nlls = jnp.concatenate([dhs, rest_dh]), jnp.concatenate([nlls, rest_nll])
    return total, (dhs, dhead, nlls, jnp.zeros((0,), hs.dtype), jnp.zeros((0,), head.dtype))


def _nll_sum_bwd(dtype, res, g):
    dhs, dhead, nlls, h_like, head_like = res  # the *_like carry the input dtypes
    dhs = (g * dhs).astype(dtype).astype(h_like.dtype)
    dhead = (g * dhead).astype(dtype).astype(head_like.dtype)
    # d total / d mask = nll (the mask is data, but its cotangent is cheap and exact)
    return dhs, dhead, None, g * nlls


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def _chunk_kl(logits, teacher_logits):
    """Per-token KL(teacher || student) [B, c], the student's log-partition and the teacher's probabilities."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    t_logp = jax.nn.log_softmax(teacher_logits, axis=-1)
    t_p = jnp.exp(t_logp)
    kl = jnp.sum(t_p * (t_logp - (logits - lse[..., None])), axis=-1)
    return kl, lse, t_p


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl_sum(dtype, hs, head, ths, t_head, ms):
    def body(total, xs):
        h, th, m = xs
        kl, _, _ = _chunk_kl(_logits(h, head, dtype), _logits(th, t_head, dtype))
        return total + jnp.sum(kl * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ths, ms))
    return total


def _kl_sum_fwd(dtype, hs, head, ths, t_head, ms):
    head_c, t_head_c = head.astype(dtype), t_head.astype(dtype)

    def chunk(total, dhead, h, th, m):
        h_c = h.astype(dtype)
        logits = _logits(h_c, head_c, dtype)
        kl, lse, t_p = _chunk_kl(logits, _logits(th, t_head_c, dtype))
        dlogits = (jnp.exp(logits - lse[..., None]) - t_p) * m[..., None]
        dh, dhead_c = _head_grads(dlogits, h_c, head_c)
        return total + jnp.sum(kl * m), dhead_c if dhead is None else dhead + dhead_c, dh

    total, dhead, dh = chunk(jnp.zeros((), jnp.float32), None, hs[0], ths[0], ms[0])
    dhs = dh[None]
    if hs.shape[0] > 1:
        def body(carry, xs):
            total, dhead, dh = chunk(*carry, *xs)
            return (total, dhead), dh

        (total, dhead), rest = jax.lax.scan(body, (total, dhead), (hs[1:], ths[1:], ms[1:]))
        dhs = jnp.concatenate([dhs, rest])
    return total, (dhs, dhead, jnp.zeros((0,), hs.dtype), jnp.zeros((0,), head.dtype))


def _kl_sum_bwd(dtype, res, g):
    dhs, dhead, h_like, head_like = res
    dhs = (g * dhs).astype(dtype).astype(h_like.dtype)
    dhead = (g * dhead).astype(dtype).astype(head_like.dtype)
    return dhs, dhead, None, None, None  # the teacher and the mask get no gradient


_kl_sum.defvjp(_kl_sum_fwd, _kl_sum_bwd)


def chunked_token_logp(hidden, head, targets, chunk: int, dtype=jnp.float32):
    """log p(target) at every position [B, T], fp32, no gradient. hidden [B,T,D], head [D,V], targets [B,T]."""
    T = hidden.shape[1]
    chunk = max(1, min(chunk, T))
    n = -(-T // chunk)
    hs = _chunks(jax.lax.stop_gradient(hidden), chunk, n)
    ts = _chunks(targets.astype(jnp.int32), chunk, n)
    head = jax.lax.stop_gradient(head)

    def body(_, xs):
        h, t = xs
        return None, -_chunk_nll(_logits(h, head, jnp.dtype(dtype)), t)[0]

    _, logp = jax.lax.scan(body, None, (hs, ts))  # [n, B, c]
    return logp.swapaxes(0, 1).reshape(hidden.shape[0], n * chunk)[:, :T]


def token_count(mask):
    return jnp.sum(mask.astype(jnp.float32))
