"""FP8 quantisation-aware training: fake quantisation (quantise-dequantise, "qdq") around matmuls.

    y = qdq_e4m3(x; s_x) . qdq_e4m3(W; s_W)          forward
    dy -> qdq_e5m2(dy; s_g)                           backward, before it reaches x and W

Values are divided by a per-tensor scale s, clipped to the format's largest finite value (448 in
e4m3fn, 57344 in e5m2: a plain cast of anything beyond gives NaN or inf), rounded to nearest even
by the cast, and multiplied back by s. Gradients pass straight through the rounding (STE).

Real FP8 GEMMs on Hopper. XLA has no FP8 matmul op; its GPU GEMM rewriter turns a dot into a
cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`) when each operand is, on the path back from the dot,

    dot( convert(q_x: f8 -> T) * broadcast(s_x),  convert(q_W: f8 -> T) * broadcast(s_W) )

with only layout ops (reshape, transpose, bitcast, slice, ...) in between and T the dot's own
operand type. The converts and scales fold into the GEMM (the scales become its f32 scale
arguments), so the e4m3 bytes are what the tensor cores read. Any other op on that path defeats
it: the float32 `qdq` below (convert to f32, multiply, convert to bf16) leaves a convert between
the scale and the dot and compiles to a bf16 GEMM of dequantised copies. So a quantised matmul is
`matmul` here, a custom VJP written in that pattern (as flax.linen.fp8_ops does):

  forward   q_x = quantize(x), q_W = quantize(W) (or the e4m3 kernel of an FP8-stored base), one
            2-D GEMM of their dequantised forms: e4m3 x e4m3.
  residuals q_x and q_W themselves, in e4m3 (half of bf16's bytes): the backward dequantises them
            right at its dots, so the pattern survives the layer scan and remat (GPU only, below).
  backward  dy is quantised to e5m2 (fp8.quantize_grads) and dequantised into both gradient GEMMs,
            dx = dy . W^T and dW = x^T . dy: e5m2 against e4m3. Without gradient quantisation
            they are plain compute-dtype GEMMs on the dequantised operands.

The e4m3/e5m2 codes are the same on every backend (`quantize`, in float32). The CPU has no FP8
GEMM to fold anything into, so there (`backend.is_cpu()`, in `_gemm_operand` and in what the
forward saves) an operand is the float32 dequantisation rounded to the compute dtype, exactly the
values of the plain `qdq`, and the backward gets the dequantised operands, as autodiff of qdq
around a dot keeps them. The CPU step has the same dots as with qdq + a plain matmul, and FP8
costs it no more (benchmarks/fp8_step.py, quarter preset, bf16, batch 1 x 256: 0.94x the FP8-off
step, 0.88x before; a shared machine, so +-0.05).

On a GPU in bf16 the pattern multiplies by the scale rounded to bf16, so a GPU GEMM may apply s_x and s_W each off by up to 2^-9 (relative; one factor
per tensor, wherever XLA does not remove the f32 -> bf16 -> f32 round trip of the scalar itself,
as it does not inside the layer scan). Exact f32 scales would need f32 operands and so an f32
GEMM output (XLA's GPU backend has no f32 x f32 -> bf16 GEMM): twice the output bytes of every
FP8 GEMM, and a conversion after it.

Scales: s = amax * 2^margin / fp8_max. Two recipes for activations (x) and output gradients (g):
  delayed  s from the max of an amax history of earlier steps (TransformerEngine's default);
           a site whose history is still empty (the first step) uses this step's own amax, so
           training starts from scales that fit the data rather than from s = 1
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

from nemo_jax import backend
from nemo_jax.config import PROJECTIONS, block_of

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2

RECIPES = ("delayed", "current")
# Matmuls that can be quantised: the seven LoRA targets and, off by default, the LM head (forward
# only: the fused cross-entropy never materialises the logits' gradient to quantise it).
TARGETS = (*PROJECTIONS, "lm_head")
DEFAULT_TARGETS = tuple(PROJECTIONS)
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
    """e4m3 qdq with a straight-through gradient and no observation: a weight, or the copy of a
    quantised matmul's input that LoRA's adapter reads (`matmul` reports that input's amax)."""
    return _qdq_ste(w, jax.lax.stop_gradient(scale))


def _grad_scale(observed, scale, seed, current: bool, margin: int):
    """The scale dy is rounded to e5m2 with: from its own amax (`current`, or a delayed site's first
    step: `seed`), else the state's delayed one."""
    own = compute_scale(observed, scale, E5M2, margin)
    if current:
        return own
    return scale if seed is None else jnp.where(seed, own, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _qdq_grad(y, scale, probe, current: bool, margin: int):
    return y


def _qdq_grad_fwd(y, scale, probe, current, margin):
    return y, scale


def _qdq_grad_bwd(current, margin, scale, g):
    observed = amax(g)
    s = _grad_scale(observed, scale, None, current, margin)
    return qdq(g, s, E5M2), jnp.zeros_like(scale), jax.lax.convert_element_type(observed, fp32_max_grad)


_qdq_grad.defvjp(_qdq_grad_fwd, _qdq_grad_bwd)


def quantize_output_grad(y, scale, probe, current: bool, margin: int):
    """Identity forward; backward rounds dy to e5m2 (delayed scale, or dy's own with `current`)
    and reports amax(dy) as the probe's gradient. (`matmul` does this inside its own backward.)"""
    return _qdq_grad(y, jax.lax.stop_gradient(scale), _to_max_grad(probe), current, margin)


# --- the FP8 GEMM ------------------------------------------------------------------------------------


def _gemm_operand(q, scale, dtype):
    """A GEMM operand from its FP8 codes. On a GPU: convert(q -> dtype) * scale feeding the dot
    directly, the pattern XLA's GEMM rewriter folds into an FP8 GEMM (module docstring). On the CPU
    (no FP8 GEMM to fold into): the float32 dequantisation rounded to `dtype`, `qdq`'s values."""
    if backend.is_cpu():
        return dequantize(q, scale, dtype)
    return q.astype(dtype) * scale.astype(dtype)


def _dot(a, b, contract, dtype):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _matmul(x, w, x_site, w_scale, g_site, n_in: int, grads):
    return _matmul_fwd(x, w, x_site, w_scale, g_site, n_in, grads)[0]


def _matmul_fwd(x, w, x_site, w_scale, g_site, n_in, grads):
    x_scale, _ = x_site
    k = int(np.prod(w.shape[:n_in]))
    qx = quantize(x, x_scale)
    qw = w if w.dtype == E4M3 else quantize(w, w_scale)  # an FP8-stored base is already its codes
    x_op, w_op = _gemm_operand(qx, x_scale, x.dtype), _gemm_operand(qw, w_scale, x.dtype)
    y = _dot(x_op.reshape(-1, k), w_op.reshape(k, -1), ((1,), (0,)), x.dtype)
    y = y.reshape(x.shape[:x.ndim - n_in] + w.shape[n_in:])
    # What the backward keeps: on a GPU the e4m3 codes (half of bf16's bytes), dequantised again
    # right at the backward's dots so that those are FP8 GEMMs too, across the layer scan and remat;
    # on the CPU the dequantised operands themselves, as autodiff of the plain qdq keeps them (no
    # second dequantisation pass over every kernel and activation in the backward).
    saved = (qx, qw) if not backend.is_cpu() else (x_op, w_op)
    g_scale, _, g_seed = g_site
    return y, (*saved, x_scale, w_scale, amax(x), g_scale, g_seed, jnp.zeros((0,), w.dtype))


def _matmul_bwd(n_in, grads, res, g):
    x_saved, w_saved, x_scale, w_scale, x_amax, g_scale, g_seed, w_like = res
    dtype = g.dtype
    k = int(np.prod(w_saved.shape[:n_in]))
    codes = x_saved.dtype == E4M3  # (else: the dequantised operands)
    g2 = g.reshape(-1, g.size // (x_saved.size // k))
    g_obs = None
    if grads is None:  # forward-only QAT: plain compute-dtype GEMMs on the dequantised operands
        dy = g2
        operand = dequantize
    else:  # e5m2 dy against the e4m3 operands: two FP8 GEMMs
        current, margin = grads
        observed = amax(g)
        s = _grad_scale(observed, g_scale, g_seed, current, margin)
        dy = _gemm_operand(quantize(g2, s, E5M2), s, dtype)
        g_obs = jax.lax.convert_element_type(observed, fp32_max_grad)
        operand = _gemm_operand
    x_op = operand(x_saved, x_scale, dtype) if codes else x_saved
    w_op = operand(w_saved, w_scale, dtype) if codes else w_saved
    x_op, w_op = x_op.reshape(-1, k), w_op.reshape(k, -1)
    dx = _dot(dy, w_op, ((1,), (1,)), dtype).reshape(x_saved.shape)  # dy . W^T
    dw = None
    if w_like.dtype != E4M3:  # (an FP8-stored base is frozen)
        dw = _dot(x_op, dy, ((0,), (0,)), dtype).astype(w_like.dtype).reshape(w_saved.shape)  # x^T . dy
    return dx, dw, (None, jax.lax.convert_element_type(x_amax, fp32_max_grad)), None, (None, g_obs, None)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, w, n_in: int, x_scale, w_scale, x_probe, g_meta: dict | None = None, g_probe=None,
           current: bool = False, margin: int = 0):
    """x [..., *in] . W [*in, *out] -> [..., *out] as one FP8 GEMM, x and W in e4m3 with their
    scales (W: a kernel to quantise, or the e4m3 kernel of an FP8-stored base). Straight-through
    gradients; the backward rounds dy to e5m2 when `g_meta` is given (its delayed scale; dy's own
    with `current` or while its history is empty). The probes' gradients are amax(x) and amax(dy).

    On the CPU the same numbers as qdq_e4m3(x) . qdq_e4m3(W) with dy -> qdq_e5m2(dy)
    (tests/test_gpu_fp8.py); written so that XLA's GPU compiler runs real FP8 GEMMs (module docstring).
    """
    sg = jax.lax.stop_gradient
    if g_meta is None:
        g_site, grads = (jnp.ones((), jnp.float32), _to_max_grad(0.0), jnp.zeros((), bool)), None
    else:
        g_site = (sg(g_meta["scale"]), _to_max_grad(g_probe), is_fresh(g_meta))
        grads = (current, margin)
    return _matmul(x, w, (sg(x_scale), _to_max_grad(x_probe)), sg(w_scale), g_site, n_in, grads)


def is_fresh(meta: dict):
    """Whether a delayed site has observed nothing yet (its first step): its amax history is all zero."""
    return jnp.all(meta["amax_history"] == 0)


def input_scale(spec: Fp8Spec, x, meta: dict):
    """The scale x is quantised with: the state's (delayed) or x's own amax (current). A delayed
    site's first step (an empty history) also uses x's own amax: the state's initial scale 1 says
    nothing about the data."""
    own = compute_scale(jax.lax.stop_gradient(amax(x)), meta["scale"], E4M3, spec.margin)
    if spec.recipe == "current":
        return own
    return jnp.where(is_fresh(meta), own, meta["scale"])


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

def _kernel(params: dict, target: str):
    if target == "lm_head":
        return params["lm_head"]["kernel"]
    return params["layers"][block_of(target)][target]["kernel"]


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
            params["layers"][block_of(t)][t]["kernel"] = q
            state["layers"][block_of(t)][t]["weight_scale"] = s
    return params, state


def site_state(state: dict, target: str) -> dict:
    """The state of one target's Linear: {x: meta, g: meta, [weight_scale]} ([L]-stacked)."""
    if target == "lm_head":
        return state["lm_head_fp8"]
    return state["layers"][block_of(target)][target]
