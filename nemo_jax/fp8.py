"""FP8 quantisation-aware training: fake quantisation (quantise-dequantise, "qdq") around matmuls.

    y = qdq_e4m3(x; s_x) . qdq_e4m3(W; s_W)          forward
    dy -> qdq_e5m2(dy; s_g)                           backward, before it reaches x and W

Values are divided by a per-tensor scale s, clipped to the format's largest finite value (448 in
e4m3fn, 57344 in e5m2: a plain cast of anything beyond gives NaN or inf), rounded to nearest even
by the cast, and multiplied back by s. Gradients pass straight through the rounding (STE). On
Hopper, qdq around a dot is the pattern XLA rewrites into a real FP8 GEMM.

Scales: s = amax * 2^margin / fp8_max. Two recipes for activations (x) and output gradients (g):
  delayed  s from the max of an amax history of earlier steps (TransformerEngine's default);
           the state starts at s = 1 with an empty (zero) history
  current  s from this step's own amax
Weights always use the current scale of their own amax (it costs one reduction over W and is
exactly the static per-tensor scale an FP8 export stores, so training sees the deployment's
rounding bit for bit); optionally one scale shared by q/k/v and one by gate/up, as serving
engines fuse those matmuls and would otherwise re-quantise them to the largest scale.

The scaling state is its own variable collection, `fp8`: per quantised input `x` and output
gradient `g` of every targeted Linear, {amax_history [H], scale []} (stacked [L, ...] over the
layers). It is read-only inside the model. What the model observes in a step (each site's amax)
comes out as the *gradient* of a zero "probe" in a second collection, `fp8_obs`: that is the only
way a backward-pass quantity (amax of dy) leaves a differentiated function. The probes are cast to
a float32 dtype whose gradient accumulation is `max` (flax's fp32_max_grad), so a module used
twice combines its amaxes by max, not sum. `update_state` then rolls the histories and recomputes
the scales, outside the model and outside the optimizer (no weight decay, no clipping). A
non-finite amax is recorded as 0 and a zero window keeps the previous scale, so one NaN step
neither poisons nor freezes the scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.fp8_ops import fp32_max_grad

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2

RECIPES = ("delayed", "current")
# Matmuls that can be quantised: the seven LoRA targets and, off by default, the LM head (forward
# only: the fused cross-entropy never materialises the logits' gradient to quantise it).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SHARED_GROUPS = (("q", "k", "v"), ("gate", "up"))


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    """What the model needs to know about FP8 (hashable: part of the jit cache key).

    quantize_grads=False gives inference-time simulation (export evaluation, calibration).
    base_fp8: LoRA's frozen base kernels are stored as e4m3 + per-tensor `weight_scale`.
    """

    recipe: str = "delayed"
    amax_history: int = 1024
    margin: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    shared_scales: bool = True
    base_fp8: bool = False
    quantize_grads: bool = True

    def applies(self, target: str) -> bool:
        return target in self.targets

    def shared_group(self, target: str) -> tuple[str, ...] | None:
        """The targets sharing one weight scale with `target` (None: its own scale)."""
        if not self.shared_scales:
            return None
        for group in SHARED_GROUPS:
            if target in group:
                members = tuple(t for t in group if t in self.targets)
                return members if len(members) > 1 else None
        return None


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


# --- quantisation ----------------------------------------------------------------------------------


def quantize(x, scale, dtype=E4M3):
    """x / scale, saturated to the format's finite range, rounded to nearest even (the cast)."""
    m = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


def dequantize(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale).astype(dtype)


def qdq(x, scale, dtype=E4M3):
    """Quantise-dequantise in float32, returned in x's dtype."""
    return dequantize(quantize(x, scale, dtype), scale, x.dtype)


def amax(x):
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def compute_scale(amax_value, previous, dtype=E4M3, margin: int = 0):
    """s = amax * 2^margin / fp8_max; a zero or non-finite amax keeps `previous`."""
    s = amax_value * (2.0 ** margin) / fp8_max(dtype)
    ok = jnp.isfinite(amax_value) & (amax_value > 0)
    return jnp.where(ok, s, previous).astype(jnp.float32)


def new_meta(history: int) -> dict:
    return {"amax_history": jnp.zeros((history,), jnp.float32), "scale": jnp.ones((), jnp.float32)}


def update_meta(meta: dict, observed, dtype, margin: int) -> dict:
    """Roll this step's amax into the history (newest first; non-finite or missing as 0) and set
    the scale from the window's max. Works on stacked [L, ...] metas too."""
    observed = jnp.asarray(observed, jnp.float32)
    clean = jnp.where(jnp.isfinite(observed) & (observed > 0), observed, 0.0)
    hist = meta["amax_history"]
    hist = jnp.concatenate([clean[..., None], hist[..., :-1]], axis=-1)
    scale = compute_scale(jnp.max(hist, axis=-1), meta["scale"], dtype, margin)
    return {**meta, "amax_history": hist, "scale": scale}


# --- differentiable pieces ---------------------------------------------------------------------------


def _to_max_grad(probe):
    probe = jnp.asarray(probe) if not hasattr(probe, "dtype") else probe
    if probe.dtype == fp32_max_grad:
        return probe
    return jax.lax.convert_element_type(probe.astype(jnp.float32), fp32_max_grad)


def as_probes(probes):
    """Probes as the model takes them: converted once, here, to the max-accumulating dtype, so that
    every use of one probe inside the model combines by max (each conversion's transpose would
    otherwise hand back a float32 gradient, and float32 gradients add)."""
    return jax.tree.map(_to_max_grad, probes)


@jax.custom_vjp
def _qdq_input(x, scale, probe):
    return qdq(x, scale, E4M3)


def _qdq_input_fwd(x, scale, probe):
    return qdq(x, scale, E4M3), (amax(x), scale)


def _qdq_input_bwd(res, g):
    observed, scale = res
    return g, jnp.zeros_like(scale), jax.lax.convert_element_type(observed, fp32_max_grad)


_qdq_input.defvjp(_qdq_input_fwd, _qdq_input_bwd)


def quantize_input(x, scale, probe):
    """e4m3 qdq of an activation with a straight-through gradient; the probe's gradient is amax(x)."""
    return _qdq_input(x, jax.lax.stop_gradient(scale), _to_max_grad(probe))


@jax.custom_vjp
def _qdq_ste(x, scale):
    return qdq(x, scale, E4M3)


_qdq_ste.defvjp(lambda x, s: (qdq(x, s, E4M3), s), lambda s, g: (g, jnp.zeros_like(s)))


def quantize_weight(w, scale):
    """e4m3 qdq of a weight with a straight-through gradient."""
    return _qdq_ste(w, jax.lax.stop_gradient(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _qdq_grad(y, scale, probe, current: bool, margin: int):
    return y


def _qdq_grad_fwd(y, scale, probe, current, margin):
    return y, scale


def _qdq_grad_bwd(current, margin, scale, g):
    observed = amax(g)
    s = compute_scale(observed, scale, E5M2, margin) if current else scale
    return qdq(g, s, E5M2), jnp.zeros_like(scale), jax.lax.convert_element_type(observed, fp32_max_grad)


_qdq_grad.defvjp(_qdq_grad_fwd, _qdq_grad_bwd)


def quantize_output_grad(y, scale, probe, current: bool, margin: int):
    """Identity forward; backward rounds dy to e5m2 (delayed scale, or dy's own with `current`)
    and reports amax(dy) as the probe's gradient."""
    return _qdq_grad(y, jax.lax.stop_gradient(scale), _to_max_grad(probe), current, margin)


def input_scale(spec: Fp8Spec, x, meta: dict):
    """The scale x is quantised with: the state's (delayed) or x's own amax (current)."""
    if spec.recipe == "current":
        return compute_scale(jax.lax.stop_gradient(amax(x)), meta["scale"], E4M3, spec.margin)
    return meta["scale"]


def weight_scale(amax_value):
    return compute_scale(amax_value, jnp.float32(1.0), E4M3, 0)


# --- state -------------------------------------------------------------------------------------------


def _site_dtype(name: str):
    return E5M2 if name == "g" else E4M3


def update_state(state: dict, observed: dict, spec: Fp8Spec) -> dict:
    """New `fp8` collection from the old one and this step's observations (`fp8_obs` gradients).

    Both trees have the same nesting down to the sites (`x`, `g`); a state site is a meta dict, an
    observation site is an amax (stacked [L] for layers). Sites without observations (the frozen
    `weight_scale` of an FP8-stored base) are kept as they are.
    """
    out = {}
    for key, value in state.items():
        obs = observed.get(key) if isinstance(observed, dict) else None
        if isinstance(value, dict) and "amax_history" in value:
            out[key] = value if obs is None else update_meta(value, obs, _site_dtype(key), spec.margin)
        elif isinstance(value, dict):
            out[key] = update_state(value, obs if obs is not None else {}, spec)
        else:
            out[key] = value
    return out


def combine_observations(a, b):
    """Observations of two micro-batches: the max (NaN propagates and is later recorded as 0)."""
    return jax.tree.map(jnp.maximum, a, b)


def zero_observations(probes):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), probes)


def history_of(state: dict) -> np.ndarray:
    """All amax histories, flattened (for tests and reports)."""
    leaves = [v for p, v in jax.tree_util.tree_leaves_with_path(state)
              if getattr(p[-1], "key", None) == "amax_history"]
    return np.concatenate([np.asarray(x).ravel() for x in leaves]) if leaves else np.zeros(0)


# --- weights -----------------------------------------------------------------------------------------

_BLOCK = {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
          "gate": "mlp", "up": "mlp", "down": "mlp"}


def _kernel(params: dict, target: str):
    if target == "lm_head":
        return params["lm_head"]["kernel"]
    return params["layers"][_BLOCK[target]][target]["kernel"]


def weight_scales(params: dict, spec: Fp8Spec) -> dict:
    """{target: per-tensor weight scale} ([L] for the layers' kernels), shared within q/k/v and
    gate/up when spec.shared_scales: exactly the scales the training forward quantises with."""
    amaxes = {}
    for t in spec.targets:
        k = _kernel(params, t).astype(jnp.float32)
        amaxes[t] = jnp.max(jnp.abs(k), axis=None if t == "lm_head" else tuple(range(1, k.ndim)))
    for t in spec.targets:
        group = spec.shared_group(t)
        if group:
            amaxes[t] = functools.reduce(jnp.maximum, [amaxes[u] for u in group])
    return {t: weight_scale(a) for t, a in amaxes.items()}


def _expand(scale, x):
    return scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))


def quantize_base(params: dict, state: dict, spec: Fp8Spec) -> tuple[dict, dict]:
    """A frozen base with its targeted kernels stored as e4m3 (half of bf16's memory) and their
    scales in the state's `weight_scale` slots. Dequantised, each kernel is exactly its qdq."""
    scales = weight_scales(params, spec)
    params = jax.tree.map(lambda x: x, params)  # a copy of the nesting; leaves are replaced below
    state = jax.tree.map(lambda x: x, state)
    for t, s in scales.items():
        k = _kernel(params, t)
        q = quantize(k, _expand(s, k), E4M3)
        if t == "lm_head":
            params["lm_head"]["kernel"] = q
            state["lm_head_fp8"]["weight_scale"] = s
        else:
            params["layers"][_BLOCK[t]][t]["kernel"] = q
            state["layers"][_BLOCK[t]][t]["weight_scale"] = s
    return params, state


def site_state(state: dict, target: str) -> dict:
    """The state of one target's Linear: {x: meta, g: meta, [weight_scale]} ([L]-stacked)."""
    if target == "lm_head":
        return state["lm_head_fp8"]
    return state["layers"][_BLOCK[target]][target]
