"""The Mistral NeMo decoder in Flax Linen, used functionally.

    tokens -> embed -> L x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head -> logits

Axis alphabet (einsum strings and shape comments use it everywhere):
    B batch, T query length, S key length, D model dim (5120), N query heads (32), K kv heads (8),
    H head dim (128; note N*H = 4096 != D), F ffn dim (14336), V vocab (131072), L layers (40),
    R LoRA rank.

Parameters are a plain nested dict; this tree *is* the checkpoint layout:

    embed/embedding [V, D]
    layers/attention_norm/scale [L, D]      layers/ffn_norm/scale [L, D]
    layers/attention/{q: [L, D, N, H], k,v: [L, D, K, H], o: [L, N, H, D]}/kernel
    layers/mlp/{gate, up: [L, D, F], down: [L, F, D]}/kernel
    final_norm/scale [D]                    lm_head/kernel [D, V]

The layers are stacked on a leading L axis and run with `nn.scan`: one compiled block whatever the
depth, and [L, ...] arrays that shard and save as single tensors. LoRA adapters live in their own
`lora` collection with the same layout (see lora.py), so the base params can stay frozen and
optimizer-free. Every parameter carries logical axis names (`embed`, `heads`, ...) that
sharding.py maps to mesh axes. A training step whose layer loop is fully unrolled takes the
layers as a list of per-layer trees instead (`unstack_layers`); `forward` runs either layout.

RoPE (attention.rope) uses the rotate-half convention of HF checkpoints; Mistral's consolidated
layout (interleaved) is permuted to it on import (checkpoint/layout.py). Attention itself, training
kernels and decoding's cached attention, is attention.py's.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from nemo_jax import backend
from nemo_jax import fp8, quant_base
from nemo_jax.attention import attention, cached_attention, new_token_mask, rope
from nemo_jax.config import PROJECTIONS, ModelConfig
from nemo_jax.fp8 import Fp8Spec, as_probes  # by name: `fp8` is also a field and forward's argument
from nemo_jax.sharding import constrain

LORA_TARGETS = tuple(PROJECTIONS)

# Remat policies selectable by name; applied to the scanned block.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What the model needs to know about LoRA: rank 0 means no adapters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def _dtype(name: str):
    return jnp.dtype(name)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        # Normalise in fp32 (bf16 squares lose too much), then scale in the compute dtype as HF does.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _matmul(x, w, n_in: int):
    """x [..., *in] . w [*in, *out] -> [..., *out], contracting x's last n_in axes with w's first.

    On a GPU (or TPU) a plain tensordot under autodiff: the program XLA's GPU compiler maps best onto
    cuBLAS (it picks the GEMM layouts and transposes itself). On the CPU, `_matmul_cpu`.
    """
    if backend.is_cpu():
        return _matmul_cpu(x, w, n_in)
    return jnp.tensordot(x, w, n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_cpu(x, w, n_in: int):
    """CPU only: tensordot(x, w, n_in) as one 2-D GEMM, with its backward written out.

    The backward pass is the two 2-D GEMMs it is, dx = dy . W^T and dW = x^T . dy, with x's leading
    axes merged into one token axis: autodiff of the N-D contraction makes XLA:CPU first write the
    activations' gradients transposed through strided loop fusions (the slowest ops of a CPU
    training step) and the multi-axis kernels (q, k, v, o) transposed. The kernel's own shape is
    what the forward keeps for the backward (a reshaped copy would be saved per layer).
    """
    lead, k = x.shape[:x.ndim - n_in], int(np.prod(w.shape[:n_in]))
    return jnp.dot(x.reshape(-1, k), w.reshape(k, -1)).reshape(lead + w.shape[n_in:])


def _matmul_cpu_fwd(x, w, n_in):
    return _matmul_cpu(x, w, n_in), (x, w)


def _matmul_cpu_bwd(n_in, res, dy):
    x, w = res
    k = int(np.prod(w.shape[:n_in]))
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    dy2 = dy.reshape(x2.shape[0], -1)
    dx = jax.lax.dot_general(dy2, w2, (((1,), (1,)), ((), ())), preferred_element_type=x.dtype)
    dw = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), preferred_element_type=w.dtype)
    return dx.reshape(x.shape), dw.reshape(w.shape)


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


class Linear(nn.Module):
    """y = x . W (+ LoRA), contracting the last len(in_shape) axes of x with W's leading axes.

    With `lora` set, adds (alpha/r) * dropout(x) . A . B from the `lora` collection; B starts at zero
    so an untrained adapter leaves the base model exactly as it was.

    With `fp8` set, the base matmul is fp8.matmul: e4m3 input and weight, its output gradient rounded
    to e5m2 (an FP8 GEMM each on Hopper, fake quantisation on the CPU); the adapter sees the same quantised input (what a served,
    merged and quantised model sees) but stays in the compute dtype. `weight_amax` is the amax a
    shared weight scale is taken from (q/k/v, gate/up); by default the kernel's own.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel's axes (in then out)
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None
    deterministic: bool = True
    fp8: Fp8Spec | None = None

    @nn.compact
    def __call__(self, x, weight_amax=None):
        n_in = len(self.in_shape)
        fan_in = int(np.prod(self.in_shape))
        if self.has_variable("params", "codes") or self.has_variable("params", "int8"):
            # a quantised base (quant_base.py): this layer's kernel, dequantised right here
            kernel = quant_base.dequantize_kernel(self.variables["params"], self.in_shape, self.out_shape, self.dtype)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.normal(stddev=fan_in ** -0.5), self.axes),
                self.in_shape + self.out_shape,
                self.param_dtype,
            )
        ab = None
        if self.lora is not None:
            r = self.lora.rank
            in_axes, out_axes = self.axes[:n_in], self.axes[n_in:]
            a = self.variable("lora", "a", lambda: nn.with_logical_partitioning(
                nn.initializers.normal(stddev=fan_in ** -0.5), in_axes + ("lora_rank",))(
                    self.make_rng("params"), self.in_shape + (r,), self.param_dtype))
            b = self.variable("lora", "b", lambda: nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora_rank",) + out_axes)(
                    self.make_rng("params"), (r,) + self.out_shape, self.param_dtype))
            ab = (nn.unbox(a.value), nn.unbox(b.value))
        h = x.astype(self.dtype)
        if self.fp8 is not None:
            h, y = self._fp8_matmul(h, kernel, n_in, weight_amax)
        else:
            y = _matmul(h, kernel.astype(self.dtype), n_in)
        if ab is not None:
            if self.lora.dropout > 0.0 and not self.deterministic:
                h = nn.Dropout(self.lora.dropout)(h, deterministic=False)
            h = _matmul(h, ab[0].astype(self.dtype), n_in)  # [..., R]
            y = y + self.lora.scale * _matmul(h, ab[1].astype(self.dtype), 1)
        return y

    def _fp8_matmul(self, h, kernel, n_in, weight_amax):
        """(the adapter's input, the base matmul): e4m3 x e4m3 in one FP8 GEMM (fp8.matmul), its
        backward e5m2 x e4m3 with gradient quantisation. An adapter adds its branch on the same
        quantised input, in the compute dtype, as a served FP8 base with a LoRA adapter on top
        (vLLM) computes it."""
        spec = self.fp8
        x_meta = self.variable("fp8", "x", fp8.new_meta, spec.amax_history).value
        x_scale = fp8.input_scale(spec, h, x_meta)
        if spec.base_fp8:
            w_scale = self.variable("fp8", "weight_scale", lambda: jnp.ones((), jnp.float32)).value
        if kernel.dtype != fp8.E4M3:  # (an FP8-stored base is already quantised, with its scale above)
            w_scale = fp8.weight_scale(jax.lax.stop_gradient(fp8.amax(kernel) if weight_amax is None else weight_amax))
        g_meta = g_probe = None
        if spec.quantize_grads:
            g_meta = self.variable("fp8", "g", fp8.new_meta, spec.amax_history).value
            g_probe = _probe(self, "g")
        y = fp8.matmul(h, kernel, n_in, x_scale, w_scale, _probe(self, "x"), g_meta, g_probe,
                      spec.recipe == "current", spec.margin)
        if self.lora is not None:
            h = fp8.quantize_weight(h, x_scale)
        return h, y


def _probe(module: nn.Module, name: str):
    """The zero whose gradient is this site's amax: from `fp8_obs` when the caller differentiates
    through it (and at init), else a constant."""
    if module.is_mutable_collection("fp8_obs") or module.has_variable("fp8_obs", name):
        return module.variable("fp8_obs", name, lambda: jnp.zeros((), jnp.float32)).value
    return jnp.zeros((), jnp.float32)


def _fp8_for(spec: Fp8Spec | None, target: str) -> Fp8Spec | None:
    return spec if spec is not None and spec.applies(target) else None


def _shared_amax(module: nn.Module, spec: Fp8Spec | None, targets: tuple[str, ...]) -> dict:
    """{target: the amax its weight scale is taken from} for the targeted kernels among `targets`
    that share one scale (empty: each its own; also at init and for an FP8-stored base, whose
    scales were shared when it was quantised)."""
    group = spec.shared_group(targets[0]) if spec is not None else None
    if group is None or module.is_initializing() or "params" not in module.variables:
        return {}
    kernels = [module.variables["params"][t]["kernel"] for t in group]
    if any(k.dtype == fp8.E4M3 for k in kernels):
        return {}  # an FP8-stored base: its scales were shared when it was quantised
    amaxes = [fp8.amax(k) for k in kernels]
    shared = functools.reduce(jnp.maximum, amaxes)
    return {t: shared for t in group}


def _lora_for(lora: LoraSpec | None, target: str) -> LoraSpec | None:
    return lora if lora is not None and lora.rank > 0 and target in lora.targets else None


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None
    deterministic: bool = True
    fp8: Fp8Spec | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        """-> (out [B, T, D], None) in training; with a `cache`, (out, this call's {k, v: [B, K, T, H]}).

        With `cache` ({k, v: [B, K, S, H]}, read only), `mask` is (cached_valid [B, S], new_mask
        [B, 1, T, T]): the queries attend to the valid cached keys and, causally, to this call's own
        keys. The caller writes the returned keys (after rope: old slots never need their positions
        again) into the cache, once for all layers.
        """
        D = x.shape[-1]
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
        lin = lambda t, i, o, axes: Linear(i, o, axes, lora=_lora_for(self.lora, t), fp8=_fp8_for(self.fp8, t),
                                           name=t, **kw)
        shared = _shared_amax(self, self.fp8, ("q", "k", "v"))  # one FP8 GEMM when served
        q = lin("q", (D,), (N, H), ("embed", "heads", "head_dim"))(x, shared.get("q"))
        k = lin("k", (D,), (K, H), ("embed", "kv_heads", "head_dim"))(x, shared.get("k"))
        v = lin("v", (D,), (K, H), ("embed", "kv_heads", "head_dim"))(x, shared.get("v"))
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if cache is None:
            # `mask` is the segment ids here. attention.py picks the kernel: dense XLA for short rows,
            # cuDNN on GPU (segments as a bias), else blockwise flash attention; all honour segments.
            out = attention(q, k, v, mask)  # [B, T, N, H]
        else:
            cached_valid, new_mask = mask
            out = cached_attention(q, k, v, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype),
                                   cached_valid, new_mask)
            cache = {"k": k.swapaxes(1, 2).astype(cache["k"].dtype), "v": v.swapaxes(1, 2).astype(cache["v"].dtype)}
        out = checkpoint_name(out, "attention_out")
        out = lin("o", (N, H), (D,), ("heads", "head_dim", "embed"))(out)
        return out, cache


class Mlp(nn.Module):
    hidden_dim: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None
    deterministic: bool = True
    fp8: Fp8Spec | None = None

    @nn.compact
    def __call__(self, x):
        D, F = x.shape[-1], self.hidden_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
        lin = lambda t, i, o, axes: Linear(i, o, axes, lora=_lora_for(self.lora, t), fp8=_fp8_for(self.fp8, t),
                                           name=t, **kw)
        shared = _shared_amax(self, self.fp8, ("gate", "up"))
        gate = lin("gate", (D,), (F,), ("embed", "mlp"))(x, shared.get("gate"))
        up = lin("up", (D,), (F,), ("embed", "mlp"))(x, shared.get("up"))
        return lin("down", (F,), (D,), ("mlp", "embed"))(nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig
    lora: LoraSpec | None = None
    deterministic: bool = True
    fp8: Fp8Spec | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.config
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))  # the residual stream, at every block boundary
        h = RMSNorm(c.norm_eps, dt, pdt, name="attention_norm")(x)
        h, cache = Attention(c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta, dt, pdt, self.lora,
                             self.deterministic, self.fp8, name="attention")(h, positions, mask, cache, cache_index)
        x = x + h
        h = RMSNorm(c.norm_eps, dt, pdt, name="ffn_norm")(x)
        x = x + Mlp(c.hidden_dim, dt, pdt, self.lora, self.deterministic, self.fp8, name="mlp")(h)
        return x, cache  # scan carries x; the new keys/values (None in training) are stacked as ys


class Transformer(nn.Module):
    config: ModelConfig
    lora: LoraSpec | None = None
    remat: str = "none"
    deterministic: bool = True
    fp8: Fp8Spec | None = None
    # Layers per iteration of the scanned loop (stacked params): unrolling trades compile time for no
    # per-iteration dynamic slicing of the stacked weights and no zero-filled stacked gradient
    # buffers (see model.scan_unroll in the README).
    scan_unroll: int = 1
    # Per-layer params (`unstack_layers`): the layers are a Python loop of blocks layers_0 ... (no
    # scan). Only `forward` sets it, from the layout of the params it is given.
    unstacked: bool = False

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False,
                 cache: dict | None = None, cache_index=None):
        """logits [B, T, V] (or (hidden, lm head) with return_hidden) for tokens [B, T].

        Training/scoring: no cache; segment_ids [B, T] keep packed documents apart (0 = padding).
        Decoding: `cache` from `init_cache` ({k, v: [L, B, K, S, H], valid: [B, S]}) and
        `cache_index`, the slot of tokens[:, 0]; segment_ids then only say which tokens are real
        (0 = padding, never attended). Returns (output, updated cache).
        """
        c = self.config
        dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)
            if cache is not None:
                positions = cache_index + positions
            positions = jnp.broadcast_to(positions, (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        embedding = self.param_in("embed", "embedding", (c.vocab_size, c.dim), ("vocab", "embed"),
                                  nn.initializers.normal(1.0), pdt)
        x = jnp.take(embedding, tokens, axis=0).astype(dt)  # [B, T, D]

        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        scan = functools.partial(
            nn.scan,
            block,
            variable_axes={"params": 0, "lora": 0, "fp8": 0, "fp8_obs": 0},
            split_rngs={"params": True, "dropout": True},
            length=c.n_layers,
            unroll=max(1, min(self.scan_unroll, c.n_layers)),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if self.unstacked:
            for i in range(c.n_layers):
                x, _ = block(c, self.lora, self.deterministic, self.fp8, name=f"layers_{i}")(x, positions, segment_ids)
        elif cache is None:
            x, _ = scan(in_axes=(nn.broadcast, nn.broadcast))(
                c, self.lora, self.deterministic, self.fp8, name="layers")(x, positions, segment_ids)
        else:
            # Each layer reads its [B, K, S, H] slice of the cache (scan xs) and returns its new keys and
            # values (ys, [L, B, K, T, H]), written here in one update. Slots from cache_index on are
            # not attended even if written before (a rewound cache). A cache_index of (Python) 0 is a
            # prefill: the cache is not read at all.
            new_valid = segment_ids != 0
            cached_valid = cache["valid"] & (jnp.arange(cache["valid"].shape[-1]) < cache_index)
            fresh = isinstance(cache_index, int) and cache_index == 0
            mask = (None if fresh else cached_valid, new_token_mask(new_valid))
            x, new = scan(in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))(
                c, self.lora, self.deterministic, self.fp8, name="layers")(
                    x, positions, mask, {"k": cache["k"], "v": cache["v"]}, cache_index)
            at = (0, 0, 0, cache_index, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], new["k"], at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], new["v"], at),
                     "valid": jax.lax.dynamic_update_slice(cached_valid, new_valid, (0, cache_index))}

        x = RMSNorm(c.norm_eps, dt, pdt, name="final_norm")(x)
        head = self.param_in("lm_head", "kernel", (c.dim, c.vocab_size), ("embed", "vocab"),
                             nn.initializers.normal(c.dim ** -0.5), pdt)
        if self.fp8 is not None and self.fp8.applies("lm_head"):
            x, head = _Fp8Head(self.fp8, dt, name="lm_head_fp8")(x, head)
        if return_hidden:
            out = (x, head)
        else:
            out = jnp.einsum("BTD,DV->BTV", x, head.astype(dt), preferred_element_type=jnp.float32)
        return out if cache is None else (out, cache)

    def param_in(self, scope: str, name: str, shape, axes, init, dtype):
        """A parameter under a named sub-scope (`embed/embedding`) without a wrapper module."""
        return _Param(name, shape, axes, init, dtype, name=scope)()


class _Fp8Head(nn.Module):
    """Forward-only FP8 qdq of the LM head's input and kernel (the fused cross-entropy keeps the
    logits' gradient in the compute dtype)."""

    fp8: Fp8Spec
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, head):
        meta = self.variable("fp8", "x", fp8.new_meta, self.fp8.amax_history).value
        x = fp8.quantize_input(x, fp8.input_scale(self.fp8, x, meta), _probe(self, "x"))
        if head.dtype == fp8.E4M3:
            head = fp8.dequantize(head, self.variable("fp8", "weight_scale", lambda: jnp.ones((), jnp.float32)).value,
                                 self.dtype)
        else:
            head = fp8.quantize_weight(head, fp8.weight_scale(jax.lax.stop_gradient(fp8.amax(head))))
        return x, head


class _Param(nn.Module):
    pname: str
    shape: tuple
    axes: tuple
    initializer: object
    dtype: object

    @nn.compact
    def __call__(self):
        return self.param(self.pname, nn.with_logical_partitioning(self.initializer, self.axes), self.shape, self.dtype)


# --- functional API ----------------------------------------------------------------------------------


def make_model(config: ModelConfig, lora: LoraSpec | None = None, remat: str = "none",
               deterministic: bool = True, fp8: Fp8Spec | None = None, scan_unroll: int = 1) -> Transformer:
    if lora is not None and lora.rank == 0:
        lora = None
    return Transformer(config, lora, remat, deterministic, fp8, scan_unroll)


def _dummy_inputs():
    return jnp.zeros((1, 1), jnp.int32)


def init_boxed(config: ModelConfig, rng, lora: LoraSpec | None = None, fp8: Fp8Spec | None = None):
    """Variables with their logical-axis metadata boxes (use under eval_shape for specs)."""
    return make_model(config, lora, fp8=fp8).init(rng, _dummy_inputs())


def init_params(config: ModelConfig, rng, lora: LoraSpec | None = None, fp8: Fp8Spec | None = None) -> dict:
    """Random variables as plain dicts: {'params':..., 'lora':... (with lora), 'fp8', 'fp8_obs' (with fp8)}."""
    return nn.meta.unbox(jax.jit(lambda r: init_boxed(config, r, lora, fp8))(rng))


def abstract_variables(config: ModelConfig, lora: LoraSpec | None = None, fp8: Fp8Spec | None = None):
    """ShapeDtypeStructs of every variable, allocating nothing (works for the 12B preset on a laptop)."""
    return nn.meta.unbox(jax.eval_shape(lambda: init_boxed(config, jax.random.key(0), lora, fp8)))


def logical_axes(config: ModelConfig, lora: LoraSpec | None = None):
    """The same tree as the variables, each leaf a tuple of logical axis names."""
    boxed = jax.eval_shape(lambda: init_boxed(config, jax.random.key(0), lora))
    return nn.get_partition_spec(boxed)


def init_fp8(config: ModelConfig, fp8: Fp8Spec, lora: LoraSpec | None = None) -> tuple[dict, dict]:
    """(fp8 scaling state, zero probes) for a model: scales 1, empty histories."""
    v = jax.eval_shape(lambda: nn.meta.unbox(init_boxed(config, jax.random.key(0), lora, fp8)))
    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones(x.shape, x.dtype) if getattr(p[-1], "key", None) in ("scale", "weight_scale")
        else jnp.zeros(x.shape, x.dtype), v["fp8"])
    return state, zeros(v["fp8_obs"])


def unstack_layers(tree):
    """{"layers": [L, ...] leaves, ...} -> {"layers": [layer 0's tree, ..., layer L-1's], ...}.

    The layout of a training state whose layer loop is fully unrolled: each layer's weights (and
    gradients and moments) are arrays of their own, so XLA neither copies them out of the stacks in
    every step nor concatenates the per-layer gradients back (benchmarks/train_step.py). `forward`
    takes either layout; checkpoints are always stacked (`stack_layers`). Trees without "layers"
    are returned as they are.
    """
    if not isinstance(tree, dict) or not isinstance(tree.get("layers"), dict):
        return tree
    leaves, treedef = jax.tree.flatten(tree["layers"])
    n = leaves[0].shape[0]
    return {**tree, "layers": [jax.tree.unflatten(treedef, [x[i] for x in leaves]) for i in range(n)]}


def stack_layers(tree):
    """The inverse of `unstack_layers` (stacked trees are returned as they are)."""
    if not isinstance(tree, dict) or not isinstance(tree.get("layers"), (list, tuple)):
        return tree
    return {**tree, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *tree["layers"])}


def _per_layer_modules(tree, n_layers: int):
    """A variable collection as the unrolled model's modules take it: layers_0 ... layers_{L-1}."""
    if not isinstance(tree, dict) or "layers" not in tree:
        return tree
    layers = tree["layers"]
    if isinstance(layers, dict):  # stacked (small collections: adapters, FP8 scales): slice here
        layers = unstack_layers(tree)["layers"]
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} per-layer trees for a model of {n_layers} layers")
    rest = {k: v for k, v in tree.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": t for i, t in enumerate(layers)}}


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# What `forward` runs besides the base weights comes in one small frozen object per role, so that a
# call names the roles it uses (`adapters=`, `fp8=`, `decoding=`, `loop=`) and a spec never travels
# without its arrays. Those holding arrays are pytrees (their specs static): they may cross a jit
# boundary as they are.


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class Adapters:
    """LoRA adapters to apply: their `lora` collection (lora.init_lora's layout) and its spec."""

    spec: LoraSpec
    params: dict

    @classmethod
    def of(cls, spec: LoraSpec | None, params: dict | None) -> Adapters | None:
        """Adapters when both halves are given, else None (no adapters), as `logits` and `generate` take them."""
        return cls(spec, params) if spec is not None and params is not None else None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state", "probes"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class Fp8Scaling:
    """FP8 fake quantisation of the targeted matmuls: the recipe, its scaling state (`init_fp8`'s
    first half) and optionally the zero probes whose gradient is each site's amax (its second half)."""

    spec: Fp8Spec
    state: dict
    probes: dict | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["cache", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Decoding:
    """A decoding call: the KV cache (`init_cache`) and `index`, the slot of tokens[:, 0]. An index of
    Python 0 (not a traced one, which gives the same output) is a prefill that skips reading the cache."""

    cache: dict
    index: int | jax.Array


@dataclasses.dataclass(frozen=True)
class LayerLoop:
    """How the layer loop is compiled, not what it computes: the remat policy of each block
    (REMAT_POLICIES) and the layers per iteration of the scan (hashable: a jit static argument)."""

    remat: str = "none"
    unroll: int = 1


def forward(config: ModelConfig, params: dict, tokens, positions=None, segment_ids=None, *,
            adapters: Adapters | None = None, fp8: Fp8Scaling | None = None, decoding: Decoding | None = None,
            dropout_rng=None, loop: LayerLoop = LayerLoop(), return_hidden: bool = False):
    """The model's output, logits [B, T, V] or with `return_hidden` (hidden [B, T, D], lm head);
    with `decoding`, (output, updated cache).

    `dropout_rng`: a key turns the adapters' dropout on (training); None is deterministic. With
    `fp8`, the targeted matmuls are fake-quantised with the scales in `fp8.state`; the gradient of
    the output with respect to `fp8.probes` (zeros from `init_fp8`) is each site's amax.
    """
    lora = adapters.spec if adapters is not None else None
    model = make_model(config, lora, loop.remat, dropout_rng is None, fp8.spec if fp8 is not None else None,
                       loop.unroll)
    variables = {"params": params}
    if adapters is not None:
        variables["lora"] = adapters.params
    if fp8 is not None:
        if fp8.state is None:
            raise ValueError("forward with fp8 needs its scaling state (see init_fp8)")
        variables["fp8"] = fp8.state
        if fp8.probes is not None:
            variables["fp8_obs"] = fp8.probes
    if isinstance(params.get("layers"), (list, tuple)):  # unstack_layers' layout: a Python loop of blocks
        if decoding is not None:
            raise ValueError("decoding with a cache takes stacked params (model.stack_layers)")
        model = model.clone(unstacked=True)
        variables = {k: _per_layer_modules(v, config.n_layers) for k, v in variables.items()}
    if "fp8_obs" in variables:  # after any per-layer slicing: the probes' max-gradient dtype has no slice
        variables["fp8_obs"] = as_probes(variables["fp8_obs"])
    cache, cache_index = (decoding.cache, decoding.index) if decoding is not None else (None, None)
    return model.apply(variables, tokens, positions, segment_ids, return_hidden=return_hidden,
                       rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
                       cache=cache, cache_index=cache_index)


def init_cache(config: ModelConfig, batch_size: int, length: int, dtype=None) -> dict:
    """An empty KV cache of `length` slots per row: {k, v: [L, B, K, S, H], valid: bool [B, S]}.

    A plain pytree threaded through `forward(..., decoding=Decoding(cache, index))`: the stacked k/v are the
    scanned layers' xs and come back as their ys. Keys are stored after rope, in the compute dtype.
    """
    shape = (config.n_layers, batch_size, config.n_kv_heads, length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch_size, length), bool)}


def logits(config: ModelConfig, params: dict, tokens, positions=None, segment_ids=None, *,
           lora_params: dict | None = None, lora: LoraSpec | None = None):
    """float32 logits [B, T, V] for int tokens [B, T] (one document per row unless segment_ids say otherwise)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return _logits_jit(config, lora, params, tokens, positions, segment_ids, lora_params)


_logits_jit = jax.jit(
    lambda config, lora, params, tokens, positions, segment_ids, lora_params: forward(
        config, params, tokens, positions, segment_ids, adapters=Adapters.of(lora, lora_params)),
    static_argnums=(0, 1),
)
