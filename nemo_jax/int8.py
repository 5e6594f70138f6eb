"""INT8: the frozen base of a QLoRA run stored in 8 bits, in bitsandbytes' LLM.int8() weight format.

`lora.quantize_base: int8` keeps each targeted kernel as bitsandbytes' `Int8Params` hold it (and as
transformers saves a `load_in_8bit` model): per layer, torch's weight [out, in] row-wise quantised,
each row scaled by its absmax (`SCB`, float32) to round(w * 127 / absmax) in int8. That is 8 bits a
weight plus 32 bits a row; the rows are 5120-14336 weights long in NeMo, so ~8.006 bits.

A quantised kernel replaces `{kernel: [L, *in, *out]}` in the params tree by
    {int8: int8 [L, O*I], scb: f32 [L, O]}
per layer bitsandbytes' tensors (`weight`, `SCB`) with the weight flattened in torch's order, so an
8-bit HF checkpoint loads as a copy. model.Linear dequantises one layer's kernel to the compute
dtype inside the scanned layer loop, right before its matmul (w = int8 * SCB / 127, bitsandbytes'
int8_vectorwise_dequant): the full-precision stacked kernel never exists. bitsandbytes' inference
kernel instead multiplies int8 activations by the int8 weight (with outlier columns in 16 bits);
training through it is not what PEFT does either (its 8-bit LoRA dequantises for the backward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes' int8_vectorwise_dequant multiplies by this float32 reciprocal of 127, after the scale
INV_127 = np.float32(7.874015718698502e-3)

LOGICAL_AXES = {"int8": ("layers", "quant_blocks"), "scb": ("layers", "quant_blocks")}


def quantize_rows(w):
    """torch's weight [O, I] -> (int8 [O, I], absmax f32 [O]), as bitsandbytes' int8_vectorwise_quant
    (threshold 0: no outlier columns): round(w * (127 / absmax)), ties to even."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=1)
    # torch evaluates `127.0 / absmax` as 127 * (1 / absmax), which can be an ulp off the quotient and
    # moves ties; an all-zero row has absmax 0: bitsandbytes divides by it (NaN), its weights stay 0
    scale = jnp.where(absmax > 0, jnp.float32(127.0) * (1.0 / jnp.where(absmax > 0, absmax, 1.0)), 0.0)
    return jnp.round(w * scale[:, None]).astype(jnp.int8), absmax


def dequantize_rows(q, scb, dtype=jnp.float32):
    """(int8 [O, I], SCB [O]) -> the weight [O, I] in float32 (bitsandbytes' order of products), cast."""
    return ((q.astype(jnp.float32) * scb[:, None]) * INV_127).astype(dtype)


def is_quantized(tree) -> bool:
    return isinstance(tree, dict) and "int8" in tree


def quantize_kernel(kernel, n_in: int) -> dict:
    """A stacked kernel [L, *in, *out] quantised layer by layer (each layer's torch weight [out, in])."""
    def one(k):
        i = math.prod(k.shape[:n_in])
        q, scb = quantize_rows(k.reshape(i, -1).T)
        return {"int8": q.reshape(-1), "scb": scb}

    return jax.lax.map(one, kernel)


def dequantize_kernel(q: dict, in_shape: tuple, out_shape: tuple, dtype) -> jax.Array:
    """One layer's quantised kernel back in our layout [*in, *out], in `dtype`."""
    I, O = math.prod(in_shape), math.prod(out_shape)
    w = dequantize_rows(q["int8"].reshape(O, I), q["scb"])
    return w.T.astype(dtype).reshape(tuple(in_shape) + tuple(out_shape))


def quantized_shapes(n_in_features: int, n_out_features: int, n_layers: int) -> dict:
    """ShapeDtypeStructs of a quantised stacked kernel of [O, I] = [n_out, n_in] a layer."""
    return {"int8": jax.ShapeDtypeStruct((n_layers, n_out_features * n_in_features), jnp.int8),
            "scb": jax.ShapeDtypeStruct((n_layers, n_out_features), jnp.float32)}
