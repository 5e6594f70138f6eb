"""Next-token cross-entropy computed in chunks over the sequence.

The LM head turns [B, T, D] hidden states into [B, T, V] logits; at V = 131072 and T = 8192 that is
4 GiB per sequence in fp32, more than the rest of the step. Scanning over chunks of the sequence
with the chunk body rematerialised keeps only [B, chunk, V] alive, forward and backward.

Losses are returned as sums with their token counts, so gradient accumulation and data-parallel
shards combine exactly (token-weighted), whatever the number of trained tokens per micro-batch.
"""

from __future__ import annotations

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
    ts = targets.reshape(B, n, chunk).swapaxes(0, 1)
    ms = mask.reshape(B, n, chunk).swapaxes(0, 1).astype(jnp.float32)
    head = head.astype(dtype)

    @jax.checkpoint
    def body(total, xs):
        h, t, m = xs
        logits = jnp.einsum("BcD,DV->BcV", h.astype(dtype), head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return total + jnp.sum((lse - tgt) * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total


def token_count(mask):
    return jnp.sum(mask.astype(jnp.float32))
