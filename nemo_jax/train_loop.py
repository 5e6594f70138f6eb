"""The training loop: optimizer, jitted step, throughput, stop signals.

One step = `batch_size` sequences, split into micro-batches that are scanned inside the jitted
step (gradient accumulation without a Python loop). Gradients and loss are token-weighted sums
divided once by the step's trained-token count, so k micro-batches give exactly the gradient of
one big batch.

What is trained is `trainable`: the whole param tree for full fine-tuning, or only the `lora`
adapters, in which case the base (`frozen`) is an argument of the step with no gradient and no
optimizer state.

The state `init_state` builds is what a run directory's checkpoints hold (checkpoint/runs.py:
the layout, saving, exact resume and reading a run back).
"""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nemo_jax import model, sharding
from nemo_jax.fp8 import Fp8Spec, combine_observations, update_state, zero_observations
from nemo_jax.config import ModelConfig
from nemo_jax.losses import chunked_kl_sum, chunked_nll_sum, chunked_token_logp, token_count

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


# --- optimizer --------------------------------------------------------------------------------------


def lr_schedule(tc) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to lr * min_lr_ratio at `steps` (or constant)."""
    end = tc.lr * tc.min_lr_ratio
    decay_steps = max(tc.steps - tc.warmup_steps, 1)
    if tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.min_lr_ratio)
    elif tc.schedule == "linear":
        decay = optax.linear_schedule(tc.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(tc.lr)
    if tc.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(tc.lr / tc.warmup_steps, tc.lr, tc.warmup_steps - 1) if tc.warmup_steps > 1 \
        else optax.constant_schedule(tc.lr)
    return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def decay_mask(tree):
    """Weight decay on matrices only: norms' scales (1-D per layer) are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not any(getattr(k, "key", None) == "scale" for k in path), tree)


class AdamState(NamedTuple):
    """The optimizer state: step count and both moments (param-shaped trees, in the params' dtypes)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def adamw(schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float = 0.0,
          mask=decay_mask, clip: float | None = None) -> optax.GradientTransformation:
    """optax.chain(clip_by_global_norm(clip), adamw(schedule, b1, b2, eps, weight_decay, mask=mask)), fused.

    Same arithmetic as the optax chain, in one elementwise expression per leaf: optax's chain makes
    XLA:CPU write the clipped gradient, both moments, the bias-corrected ratio and the update as
    separate arrays, about twice the memory traffic of the update itself (the fused form runs the
    optimizer ~20 % faster: benchmarks/train_step.py, README). Moments are kept in the params' dtypes
    (as optax's default) and updated in fp32.
    """

    def init(params):
        # tree.map over the params (not over a derived value): optax.tree_map_params, which builds
        # the optimizer state's shardings, finds the param-shaped subtrees of this state that way
        return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                         jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params, grad_scale=None):
        # grad_scale: the gradient is grads * grad_scale (train_step's division by the token count,
        # folded into the one elementwise pass instead of a pass of its own)
        count = optax.safe_increment(state.count)
        scale = jnp.ones((), jnp.float32) if grad_scale is None else jnp.asarray(grad_scale, jnp.float32)
        if clip:
            norm = optax.global_norm(grads) * scale
            scale = jnp.where(norm < clip, scale, scale * (clip / norm))
        step_size = -schedule(state.count)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        decays = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)

        def leaf(g, m, v, p, decay):
            g = g.astype(jnp.float32) * scale
            m_new = b1 * m.astype(jnp.float32) + (1 - b1) * g
            v_new = b2 * v.astype(jnp.float32) + (1 - b2) * g * g
            u = (m_new / c1) / (jnp.sqrt(v_new / c2) + eps)
            if decay and weight_decay:  # no 0 * p term without decay
                u = u + weight_decay * p.astype(jnp.float32)
            return (step_size * u).astype(p.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

        out = jax.tree.map(leaf, grads, state.mu, state.nu, params, decays)
        tree = jax.tree.structure(grads)
        updates, mu, nu = (jax.tree.unflatten(tree, [o[i] for o in tree.flatten_up_to(out)]) for i in range(3))
        return updates, AdamState(count, mu, nu)

    return FusedAdamW(init, update)


class FusedAdamW(optax.GradientTransformationExtraArgs):
    """`adamw`'s transformation: its update also takes `grad_scale` (a marker type, so that
    train_step passes it only to an update that applies it)."""


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW (no decay on norms) with global-norm clipping at tc.grad_clip (None: off)."""
    return adamw(lr_schedule(tc), tc.beta1, tc.beta2, tc.eps, tc.weight_decay, decay_mask, tc.grad_clip)


# --- the step --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """Static description of the step (hashable: part of the jit cache key)."""

    config: ModelConfig
    lora: model.LoraSpec | None
    remat: str
    n_micro: int
    loss_chunk: int
    fp8: Fp8Spec | None = None
    scan_unroll: int = 1
    # Quantisation-aware distillation: the loss is KL(teacher || student) with the teacher the
    # unquantised `frozen` params (LoRA: the base without adapters; full fine-tuning: the starting
    # weights), instead of the next-token NLL.
    distill: bool = False
    # Preference optimisation (DPO) on pair batches (preference.py) instead of the next-token NLL; the
    # reference model is the LoRA base without adapters, or for full fine-tuning the `frozen` copy of
    # the starting weights.
    dpo: DpoSpec | None = None

    @property
    def per_layer(self) -> bool:
        """Whether the step takes per-layer arrays (model.unstack_layers): a fully unrolled loop."""
        return self.scan_unroll >= self.config.n_layers > 1

    @property
    def dropout(self) -> bool:
        return self.lora is not None and self.lora.dropout > 0


@dataclass(frozen=True)
class DpoSpec:
    beta: float = 0.1
    label_smoothing: float = 0.0


REWARD_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def dpo_pair_loss(policy, reference, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss [P] and the implicit rewards of both sides, from [P, 2] (chosen, rejected)
    sequence log-probabilities: z = beta * ((pi_c - ref_c) - (pi_r - ref_r)),
    loss = -(1 - ls) log sigmoid(z) - ls log sigmoid(-z) (Rafailov et al. 2023; cDPO smoothing)."""
    rewards = beta * (policy - reference)
    z = rewards[:, 0] - rewards[:, 1]
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return loss, rewards[:, 0], rewards[:, 1]


def trained_forward(spec: StepSpec, trainable, frozen, batch, rng, fp8_state=None, fp8_probes=None):
    """(hidden, lm head) of the model being trained on `batch`: LoRA adapters (`trainable`) on the
    frozen base, or the trained weights themselves; with the spec's dropout, FP8 and remat."""
    adapters = model.Adapters(spec.lora, trainable) if spec.lora is not None else None
    fp8 = model.Fp8Scaling(spec.fp8, fp8_state, fp8_probes) if spec.fp8 is not None else None
    return model.forward(spec.config, frozen if adapters is not None else trainable, batch["tokens"],
                         batch["positions"], batch["segment_ids"], adapters=adapters, fp8=fp8,
                         dropout_rng=rng if spec.dropout else None,
                         loop=model.LayerLoop(spec.remat, spec.scan_unroll), return_hidden=True)


def plain_forward(spec: StepSpec, params, batch, adapters=None, fp8=None):
    """(hidden, lm head) of `params` on `batch` for a pass without gradient (evaluation, the DPO
    reference, the distillation teacher): no dropout, no remat."""
    return model.forward(spec.config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                         adapters=adapters, fp8=fp8, loop=model.LayerLoop(unroll=spec.scan_unroll),
                         return_hidden=True)


def pair_logps(hidden, head, batch, chunk: int, dtype):
    """[B, 2] sums of the masked token log-probabilities of each row's segment 1 (chosen) and 2
    (rejected), no gradient, and the [B, T, 2] masks they summed over."""
    seg, mask = batch["segment_ids"], batch["loss_mask"].astype(jnp.float32)
    w = jnp.stack([mask * (seg == 1), mask * (seg == 2)], axis=-1)
    logp = chunked_token_logp(hidden, head, batch["targets"], chunk, dtype)
    return jnp.einsum("BT,BTs->Bs", logp, w), w


def dpo_sums(spec: StepSpec, trainable, frozen, batch, rng, fp8_state=None, fp8_probes=None):
    """(sum of the per-pair DPO loss, stats): stats holds the pair count ("count", what the step
    divides by), the trained tokens and the sums of the reward metrics.

    The loss is a function of each pair's two sequence log-probabilities, themselves sums of token
    log-probabilities. Those are computed without gradient; the gradient comes from the chunked
    NLL with per-token weights d loss / d log p(pair side), which has the same derivative, so the
    [B, T, V] logits never exist whole, forward or backward (one extra forward pass of the head).
    """
    dtype = jnp.dtype(spec.config.dtype)
    hidden, head = trained_forward(spec, trainable, frozen, batch, rng, fp8_state, fp8_probes)
    # The reference: the starting model's plain forward (LoRA: the base without adapters), no gradient
    r_hidden, r_head = jax.lax.stop_gradient(plain_forward(spec, frozen, batch))
    policy, w = pair_logps(hidden, head, batch, spec.loss_chunk, dtype)
    reference, _ = pair_logps(r_hidden, r_head, batch, spec.loss_chunk, dtype)
    valid = (jnp.sum(w[..., 0], axis=1) > 0).astype(jnp.float32)  # rows of the last eval batch may be empty
    dpo = spec.dpo
    loss_of = lambda pol: dpo_pair_loss(pol, reference, dpo.beta, dpo.label_smoothing)[0]  # noqa: E731
    losses, d_policy = loss_of(policy), jax.grad(lambda pol: jnp.sum(loss_of(pol) * valid))(policy)
    # d loss / d logp(token) = d loss / d logp(its side); the NLL is -logp, hence the sign
    weights = jax.lax.stop_gradient(-jnp.einsum("BTs,Bs->BT", w, d_policy))
    surrogate = chunked_nll_sum(hidden, head, batch["targets"], weights, spec.loss_chunk, dtype)
    total = jnp.sum(losses * valid) + surrogate - jax.lax.stop_gradient(surrogate)
    return total, _reward_stats(losses, policy, reference, valid, w, dpo.beta)


def _reward_stats(losses, policy, reference, valid, w, beta) -> dict:
    rewards = beta * (policy - reference)
    rc, rr = rewards[:, 0], rewards[:, 1]
    return {"count": jnp.sum(valid), "tokens": jnp.sum(w),
            "rewards_chosen": jnp.sum(rc * valid), "rewards_rejected": jnp.sum(rr * valid),
            "reward_margin": jnp.sum((rc - rr) * valid), "reward_accuracy": jnp.sum((rc > rr) * valid)}


def dpo_eval_sums(spec: StepSpec, params, lora_params, reference_params, batch):
    """(sum of the per-pair DPO loss, stats as dpo_sums) without gradient. LoRA: the reference is
    `params` without adapters (reference_params unused); else `reference_params`."""
    dtype = jnp.dtype(spec.config.dtype)
    if spec.lora is not None:
        reference_params = params
    hidden, head = plain_forward(spec, params, batch, model.Adapters.of(spec.lora, lora_params))
    r_hidden, r_head = plain_forward(spec, reference_params, batch)
    policy, w = pair_logps(hidden, head, batch, spec.loss_chunk, dtype)
    reference, _ = pair_logps(r_hidden, r_head, batch, spec.loss_chunk, dtype)
    valid = (jnp.sum(w[..., 0], axis=1) > 0).astype(jnp.float32)
    losses = dpo_pair_loss(policy, reference, spec.dpo.beta, spec.dpo.label_smoothing)[0]
    return jnp.sum(losses * valid), _reward_stats(losses, policy, reference, valid, w, spec.dpo.beta)


def loss_sums(spec: StepSpec, trainable, frozen, batch, rng, fp8_state=None, fp8_probes=None):
    """(sum of the per-token loss, trained-token count) for one micro-batch: next-token NLL, or with
    spec.distill the KL divergence from the teacher's next-token distribution."""
    hidden, head = trained_forward(spec, trainable, frozen, batch, rng, fp8_state, fp8_probes)
    if spec.distill:
        # The teacher runs its plain forward (no FP8, no adapters, no dropout) and gets no gradient:
        # nothing of it is kept for the backward pass but its hidden states.
        t_hidden, t_head = jax.lax.stop_gradient(plain_forward(spec, frozen, batch))
        total = chunked_kl_sum(hidden, head, t_hidden, t_head, batch["loss_mask"], spec.loss_chunk,
                               jnp.dtype(spec.config.dtype))
    else:
        total = chunked_nll_sum(hidden, head, batch["targets"], batch["loss_mask"], spec.loss_chunk,
                                jnp.dtype(spec.config.dtype))
    return total, token_count(batch["loss_mask"])


def train_step(spec: StepSpec, opt: optax.GradientTransformation, state: dict, frozen, batch: dict):
    """One optimizer step over `batch` ([batch_size, T] arrays), accumulating n_micro micro-batches.

    With FP8, each micro-batch also yields the amax every quantised site saw (the gradients of the
    zero probes, see fp8.py); they combine by max and then update the scaling state, which is
    neither a trained parameter nor seen by the optimizer.
    """
    trainable = state["trainable"]
    fp8_state = state.get("fp8")
    probes = model.init_fp8(spec.config, spec.fp8, spec.lora)[1] if spec.fp8 is not None else {}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    def sums(t, p, b, r):  # (loss sum, stats): stats["count"] is what the step's loss is a mean over
        if spec.dpo is not None:
            return dpo_sums(spec, t, frozen, b, r, fp8_state, p or None)
        total, n = loss_sums(spec, t, frozen, b, r, fp8_state, p or None)
        return total, {"count": n, "tokens": n}

    grad_fn = jax.value_and_grad(sums, argnums=(0, 1), has_aux=True)

    if spec.n_micro == 1:  # no accumulation loop (and no zero-filled accumulators)
        (s_sum, stats), (g_sum, observed) = grad_fn(trainable, probes, batch, jax.random.fold_in(rng, 0))
    else:
        micro = jax.tree.map(lambda x: x.reshape((spec.n_micro, -1) + x.shape[1:]), batch)

        def body(acc, xs):
            mb, i = xs
            (s, st), (g, obs) = grad_fn(trainable, probes, mb, jax.random.fold_in(rng, i))
            g_acc, s_acc, st_acc, obs_acc = acc
            return (jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g), s_acc + s,
                    jax.tree.map(jnp.add, st_acc, st), combine_observations(obs_acc, obs)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        keys = ("count", "tokens") + (REWARD_METRICS if spec.dpo is not None else ())
        init = (zeros, 0.0, {k: jnp.zeros((), jnp.float32) for k in keys}, zero_observations(probes))
        (g_sum, s_sum, stats, observed), _ = jax.lax.scan(body, init, (micro, jnp.arange(spec.n_micro)))
    n_sum = stats["count"]
    denom = jnp.maximum(n_sum, 1.0)
    if isinstance(opt, FusedAdamW):
        # The optimizer divides by the token count in its one pass over the gradient (no pass of
        # its own); accumulated fp32 sums stay fp32 until then.
        grad_norm = optax.global_norm(g_sum) / denom
        updates, opt_state = opt.update(g_sum, state["opt_state"], trainable, grad_scale=1.0 / denom)
    else:
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, trainable)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = opt.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
    if fp8_state is not None:
        new_state["fp8"] = update_state(fp8_state, observed, spec.fp8)
    metrics = {"loss": s_sum / denom, "grad_norm": grad_norm, "tokens": stats["tokens"]}
    if spec.dpo is not None:
        metrics.update({k: stats[k] / denom for k in REWARD_METRICS})
    return new_state, metrics


def eval_sums(spec: StepSpec, params, lora_params, batch, fp8_state=None):
    """With FP8, the forward of the deployed model: quantised inputs and weights, the state's scales."""
    fp8 = model.Fp8Scaling(spec.fp8, fp8_state) if spec.fp8 is not None else None
    hidden, head = plain_forward(spec, params, batch, model.Adapters.of(spec.lora, lora_params), fp8)
    total = chunked_nll_sum(hidden, head, batch["targets"], batch["loss_mask"], spec.loss_chunk,
                            jnp.dtype(spec.config.dtype))
    return total, token_count(batch["loss_mask"])


# --- state, shardings, checkpoints -----------------------------------------------------------------


def init_state(trainable, opt, seed: int, fp8_state=None) -> dict:
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": opt.init(trainable),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
    if fp8_state is not None:
        state["fp8"] = fp8_state
    return state


def state_shardings(opt, trainable_abstract, trainable_shardings, mesh, fp8_abstract=None):
    """The FP8 scaling state (a few KB per layer) is replicated."""
    opt_abstract = jax.eval_shape(opt.init, trainable_abstract)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(opt, lambda _, sh: sh, opt_abstract, trainable_shardings,
                                   transform_non_params=lambda _: rep)
    out = {"step": rep, "trainable": trainable_shardings, "opt_state": opt_sh, "rng": rep}
    if fp8_abstract is not None:
        out["fp8"] = jax.tree.map(lambda _: rep, fp8_abstract)
    return out


# --- throughput -------------------------------------------------------------------------------------

_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12}


@functools.cache
def peak_flops_per_device() -> float:
    """bf16 dense peak of the accelerator; on CPU the fp32 matmul rate measured here, once per process
    (the measurement takes ~1.5 s)."""
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    for name, peak in _PEAK_FLOPS.items():
        if name in kind:
            return peak
    return measured_matmul_flops()


def measured_matmul_flops(n: int = 2048, reps: int = 2, trials: int = 5) -> float:
    """fp32 GEMM rate of this CPU: the best of `trials` timings of `reps` n^3 matmuls.

    Best-of, after a warm-up, because a single short timing on a shared machine reads low (15-30 %
    below this on the 2-core VM, which would overstate MFU by as much).
    """
    a = jnp.full((n, n), 1.0 / n, jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def flops_per_token(config: ModelConfig, seq_len: int, lora: bool) -> float:
    """Forward 2N, backward 4N for full training; with LoRA the frozen weights need no weight
    gradient, so backward is ~2N (adapter FLOPs are negligible)."""
    full = config.flops_per_token(seq_len)
    if not lora:
        return full
    return full * 4.0 / 6.0


# --- signals ----------------------------------------------------------------------------------------


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to save and stop after the current step; a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        if exc_type is SystemExit:  # stopping on a signal, ours or a peer's, with the checkpoint saved
            # A scheduler sends SIGTERM to every process, seconds apart: one that arrives while this
            # process exits (jax.distributed's shutdown barrier) would kill it there, and its peers
            # would then abort in that barrier.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping",
              flush=True)


class AgreedStop:
    """Whether to stop after the step just dispatched: the same answer on every process.

    A signal reaches each process of a multi-host run at its own moment (a scheduler's SIGTERM
    seconds apart, a Ctrl-C on one host). Acting on its own flag, one process would enter the
    checkpoint save while another ran the next step, and their collectives would not match (gloo
    fails, NCCL hangs). So after every step each process adds its flag (the signal number, 0 for
    none) to a max over a one-element-per-device array, and reads the result one step later: all
    stop after the same step, and reading never waits for the step in flight. With one process the
    local flag is the answer and nothing is computed.
    """

    def __init__(self, flag: StopFlag, mesh):
        self.flag, self._pending = flag, None
        if jax.process_count() > 1:
            self._sharding, rep = sharding.per_device(mesh), sharding.replicated(mesh)
            self._local = len(mesh.local_devices)
            self._max = jax.jit(jnp.max, out_shardings=rep)

    def __call__(self) -> int | None:
        """The signal to stop with after this step (agreed by all processes), or None."""
        if jax.process_count() == 1:
            return self.flag.signum
        local = np.full((self._local,), self.flag.signum or 0, np.int32)
        launched = self._max(jax.make_array_from_process_local_data(self._sharding, local))
        previous, self._pending = self._pending, launched
        agreed = int(np.asarray(previous.addressable_data(0))) if previous is not None else 0
        if agreed and self.flag.signum is None:
            print(f"\nanother process received {signal.Signals(agreed).name}: saving a checkpoint after this step, "
                  f"then stopping", flush=True)
        return agreed or None


def n_micro(batch_size: int, micro_batch_size: int | None) -> int:
    if not micro_batch_size:
        return 1
    return batch_size // micro_batch_size

