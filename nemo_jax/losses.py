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

Losses are returned as sums with their token counts, so gradient accumulation and data-parallel
shards combine exactly (token-weighted), whatever the number of trained tokens per micro-batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunked_nll_sum(hidden, head, targets, mask, chunk: int, dtype=jnp.float32):
    """Sum over masked positions of -log p(target). hidden [B,T,D], head [D,V], targets/mask [B,T]."""
    B, T, D = hidden.shape
    chunk = max(1, min(chunk, T))
    pad = (-T) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    n = (T + pad) // chunk
    hs = hidden.reshape(B, n, chunk, D).swapaxes(0, 1)  # [n, B, c, D]
    ts = targets.reshape(B, n, chunk).swapaxes(0, 1).astype(jnp.int32)
    ms = mask.reshape(B, n, chunk).swapaxes(0, 1).astype(jnp.float32)
    return _nll_sum(jnp.dtype(dtype), hs, head, ts, ms)


def _logits(h, head, dtype):
    return jnp.einsum("BcD,DV->BcV", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)


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
        # As the autodiff of the fp32-accumulated logits: the gradient matmuls run in fp32 whatever
        # the compute dtype (no-op casts in fp32); dh is rounded to the compute dtype after scaling.
        dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * m[..., None]
        dh = jnp.einsum("BcV,DV->BcD", dlogits, head_c.astype(jnp.float32))
        dhead = jnp.einsum("BcD,BcV->DV", h_c.astype(jnp.float32), dlogits)
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


def token_count(mask):
    return jnp.sum(mask.astype(jnp.float32))
