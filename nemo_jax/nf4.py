"""NF4: the frozen base of a QLoRA run stored in 4 bits, in bitsandbytes' format.

QLoRA (Dettmers et al. 2023) keeps the base weights NormalFloat-4 quantised and trains LoRA adapters
on top. Each block of 64 consecutive weights (in torch's [out, in] row-major order, which is what
bitsandbytes quantises) keeps its absmax in float32; each weight becomes the index of the nearest of
16 levels (NF4_CODE, quantiles of a normal distribution scaled to [-1, 1]) to w / absmax, two
indices a byte, the first in the high nibble. With double quantisation the absmaxes themselves are
stored as 8 bits: minus their mean (`offset`), in blocks of 256 with bitsandbytes' dynamic 8-bit map
and a float32 absmax per block. That is 4.5 bits a weight, 4.127 with double quantisation.

A quantised kernel replaces `{kernel: [L, *in, *out]}` in the params tree by
    {codes: uint8 [L, O*I/2], absmax: f32 [L, O*I/64]}                       (double_quant false)
    {codes, absmax: uint8 [L, O*I/64], nested_absmax: f32 [L, ceil(O*I/64/256)], offset: f32 [L]}
per layer exactly bitsandbytes' tensors (`weight`, `weight.absmax`, `weight.nested_absmax`, ...)
flattened, so a bnb-4bit HF checkpoint loads as a copy. model.Linear dequantises one layer's kernel
to the compute dtype inside the scanned layer loop, right before its matmul: the full-precision
stacked kernel never exists, under jit or outside it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
NESTED_BLOCK = 256

# bitsandbytes' NF4 levels (functional.get_4bit_type("nf4")), as float32.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236328, 1.0], np.float32)


# bitsandbytes' signed dynamic 8-bit map (functional.create_dynamic_map(signed=True)), which double
# quantisation uses for the absmaxes. Written out: torch.linspace's float32 rounding, which builds it,
# is not numpy's. tests/test_qlora.py checks it against bitsandbytes.
DYNAMIC_CODE = np.array([
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375,
    -0.107031256, -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125,
    -0.08171876, -0.07890625, -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375,
    -0.06203125, -0.059218753, -0.05640625, -0.05359375, -0.05078125, -0.04796875, -0.04515625,
    -0.042343747, -0.03953125, -0.036718752, -0.03390625, -0.03109375, -0.028281251, -0.02546875,
    -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625, -0.00971875, -0.009156249,
    -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125, -0.0052187503,
    -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002,
    -0.00026875004, -0.00015625001, -0.00008875, -0.00006625, -0.00004375, -0.000021249998, -0.00000775,
    -0.0000032500002, -0.00000055000004, 0, 0.00000055000004, 0.0000032500002, 0.00000775, 0.000021249998,
    0.00004375, 0.00006625, 0.00008875, 0.00015625001, 0.00026875004, 0.00038125002, 0.00049375003,
    0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499, 0.00184375, 0.00240625,
    0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125, 0.00634375, 0.00690625,
    0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752, 0.03953125,
    0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625, 0.059218753, 0.06203125,
    0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125,
    0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256, 0.12109375, 0.13515624,
    0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624,
    0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624,
    0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625,
    0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187,
    0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126,
    0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374,
    0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063,
    0.99296874, 1], np.float32)


def _blocks(x, block: int):
    """x (1-D) as [n_blocks, block], the last block zero-padded, and each block's absmax (float32)."""
    n = x.shape[0]
    nb = -(-n // block)
    xb = jnp.pad(x, (0, nb * block - n)).reshape(nb, block)
    return xb, jnp.max(jnp.abs(xb), axis=1)


def _quantize_blocks(x, code: np.ndarray, block: int):
    """(indices uint8 [n], absmax f32 [n_blocks]) as bitsandbytes' quantize kernels compute them:
    x * (1 / absmax) clamped to [-1, 1], then the first level whose midpoint with the next is >= it."""
    n = x.shape[0]
    xb, absmax = _blocks(x.astype(jnp.float32), block)
    scaled = jnp.clip(xb * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0).reshape(-1)[:n]
    bounds = jnp.asarray((code[:-1] + code[1:]) / np.float32(2.0))
    return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8), absmax


def _mean(x):
    """The float32 mean of a 1-D array, its sum carried as an unevaluated (hi, lo) float32 pair
    (pairwise, Knuth's TwoSum): a plain float32 sum drifts by ulps from bitsandbytes' offset,
    which then moves whole absmax codes."""
    hi, lo = x.astype(jnp.float32), jnp.zeros_like(x, jnp.float32)
    while hi.shape[0] > 1:
        if hi.shape[0] % 2:
            hi, lo = jnp.pad(hi, (0, 1)), jnp.pad(lo, (0, 1))
        a, b = hi[0::2], hi[1::2]
        s = a + b
        bv = s - a
        err = (a - (s - bv)) + (b - bv)
        hi, lo = s, lo[0::2] + lo[1::2] + err
    return (hi[0] + lo[0]) / x.shape[0]


def quantize_flat(x, double_quant: bool) -> dict:
    """One tensor, flattened in torch's order (1-D, even length), as bitsandbytes' NF4 tensors."""
    q, absmax = _quantize_blocks(x, NF4_CODE, BLOCK)
    out = {"codes": (q[0::2] << 4) | q[1::2]}
    if not double_quant:
        return {**out, "absmax": absmax}
    offset = _mean(absmax)
    qa, nested = _quantize_blocks(absmax - offset, DYNAMIC_CODE, NESTED_BLOCK)
    return {**out, "absmax": qa, "nested_absmax": nested, "offset": offset}


def dequantize_flat(q: dict, n: int, dtype) -> jax.Array:
    """bitsandbytes' dequantize_4bit: levels x block absmax in float32, then cast to `dtype`."""
    codes = q["codes"]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)[:n]
    absmax = q["absmax"]
    if "nested_absmax" in q:
        a = jnp.asarray(DYNAMIC_CODE)[absmax.astype(jnp.int32)]
        na = a.shape[0]
        ab = jnp.pad(a, (0, -(-na // NESTED_BLOCK) * NESTED_BLOCK - na)).reshape(-1, NESTED_BLOCK)
        absmax = (ab * q["nested_absmax"][:, None]).reshape(-1)[:na] + q["offset"]
    w = jnp.asarray(NF4_CODE)[idx.astype(jnp.int32)]
    nb = absmax.shape[0]
    w = jnp.pad(w, (0, nb * BLOCK - n)).reshape(nb, BLOCK) * absmax[:, None]
    return w.reshape(-1)[:n].astype(dtype)


def is_quantized(tree) -> bool:
    return isinstance(tree, dict) and "codes" in tree


def to_torch_flat(kernel, n_in: int):
    """One layer's kernel [*in, *out] as torch's weight [out, in], flattened."""
    in_size = math.prod(kernel.shape[:n_in])
    return kernel.reshape(in_size, -1).T.reshape(-1)


def dequantize_kernel(q: dict, in_shape: tuple, out_shape: tuple, dtype) -> jax.Array:
    """One layer's quantised kernel back in our layout [*in, *out], in `dtype`."""
    I, O = math.prod(in_shape), math.prod(out_shape)
    w = dequantize_flat(q, I * O, jnp.float32).reshape(O, I)
    return w.T.astype(dtype).reshape(tuple(in_shape) + tuple(out_shape))


def quantize_kernel(kernel, n_in: int, double_quant: bool) -> dict:
    """A stacked kernel [L, *in, *out] quantised layer by layer (each layer's torch weight)."""
    return jax.lax.map(lambda k: quantize_flat(to_torch_flat(k, n_in), double_quant), kernel)


def quantized_shapes(n: int, n_layers: int, double_quant: bool) -> dict:
    """ShapeDtypeStructs of a quantised stacked kernel with n = O*I weights a layer."""
    nb = -(-n // BLOCK)
    s = {"codes": jax.ShapeDtypeStruct((n_layers, n // 2), jnp.uint8)}
    if not double_quant:
        return {**s, "absmax": jax.ShapeDtypeStruct((n_layers, nb), jnp.float32)}
    return {**s, "absmax": jax.ShapeDtypeStruct((n_layers, nb), jnp.uint8),
            "nested_absmax": jax.ShapeDtypeStruct((n_layers, -(-nb // NESTED_BLOCK)), jnp.float32),
            "offset": jax.ShapeDtypeStruct((n_layers,), jnp.float32)}


# the logical axes of each quantised leaf: the flat per-layer axis shards like a kernel's `embed`
LOGICAL_AXES = {"codes": ("layers", "quant_blocks"), "absmax": ("layers", "quant_blocks"),
                "nested_absmax": ("layers", "quant_blocks"), "offset": ("layers",)}
