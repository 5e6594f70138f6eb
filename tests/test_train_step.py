"""The jitted train step on the tiny preset: LoRA at init, frozen base, loss falls, accumulation."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nemo_jax import lora as lora_lib
from nemo_jax import model as M
from nemo_jax import train_loop as TL
from nemo_jax.config import preset
from nemo_jax.losses import chunked_kl_sum, chunked_nll_sum

CFG = preset("tiny")


def train_cfg(**kw):
    base = dict(steps=20, lr=1e-2, schedule="constant", warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0,
                beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)
    base.update(kw)
    return SimpleNamespace(**base)


def make_batch(B=4, T=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, size=(B, T + 1))
    mask = np.ones((B, T), np.float32)
    mask[:, : T // 4] = 0  # a prompt that is not trained
    return {"tokens": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def reference_loss(params, batch, lora_params=None, spec=None):
    logits = M.logits(CFG, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                      lora_params=lora_params, lora=spec)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return float(jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]))


def test_chunked_loss_equals_full_logits():
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch(T=30)
    hidden, head = M.forward(CFG, params, batch["tokens"], return_hidden=True)
    for chunk in (1, 7, 30, 64):  # 7 does not divide 30: the padded tail must not count
        s = chunked_nll_sum(hidden, head, batch["targets"], batch["loss_mask"], chunk)
        np.testing.assert_allclose(float(s) / float(batch["loss_mask"].sum()), reference_loss(params, batch),
                                   rtol=1e-5)


def test_chunked_kl_equals_full_logits_value_and_gradient():
    """The distillation loss: KL(teacher || student) summed over trained tokens, chunked, custom VJP."""
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 30, 16, 50
    h, th = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(2))
    head, t_head = (jnp.asarray(rng.standard_normal((D, V)) * 0.3, jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32)

    def full(h, head):
        logp = jax.nn.log_softmax(h @ head, -1)
        t_logp = jax.nn.log_softmax(th @ t_head, -1)
        return jnp.sum(jnp.sum(jnp.exp(t_logp) * (t_logp - logp), -1) * mask)

    ref, (g_h, g_head) = jax.value_and_grad(full, argnums=(0, 1))(h, head)
    for chunk in (7, 30):  # 7 does not divide 30
        f = lambda h, head: chunked_kl_sum(h, head, th, t_head, mask, chunk)
        val, (c_h, c_head) = jax.value_and_grad(f, argnums=(0, 1))(h, head)
        np.testing.assert_allclose(float(val), float(ref), rtol=1e-5)
        np.testing.assert_allclose(c_h, g_h, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(c_head, g_head, rtol=1e-4, atol=1e-6)
    # a student equal to its teacher: zero loss, zero gradient
    val, g = jax.value_and_grad(lambda h: chunked_kl_sum(h, t_head, th, t_head, mask, 7))(th)
    assert abs(float(val)) < 1e-4 and float(jnp.abs(g).max()) < 1e-5


def test_lora_at_init_equals_base():
    spec = M.LoraSpec(rank=4, alpha=8.0)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    adapters = lora_lib.init_lora(CFG, spec, jax.random.key(1))
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(
        jax.tree.map(lambda t: t, {k: v["a"] for k, v in adapters["layers"]["attention"].items()})))
    tokens = make_batch()["tokens"]
    base = M.logits(CFG, params, tokens)
    adapted = M.logits(CFG, params, tokens, lora_params=adapters, lora=spec)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))
    # an unrolled run's step: the base as per-layer arrays, the (trained) adapters stacked
    trained = jax.tree.map(lambda x: x + 0.05, adapters)
    stacked = M.logits(CFG, params, tokens, lora_params=trained, lora=spec)
    per_layer = M.logits(CFG, M.unstack_layers(params), tokens, lora_params=trained, lora=spec)
    assert not np.allclose(stacked, base)
    np.testing.assert_allclose(per_layer, stacked, rtol=1e-5, atol=1e-6)


def run_steps(spec_lora, n_micro, steps, batch, trainable, frozen, opt=None, scan_unroll=1):
    adam = opt is None
    opt = TL.make_optimizer(train_cfg()) if adam else opt
    spec = TL.StepSpec(CFG, spec_lora, "none", n_micro, 16, scan_unroll=scan_unroll)
    state = TL.init_state(trainable, opt, 0)
    step = jax.jit(functools.partial(TL.train_step, spec, opt))
    losses = []
    for _ in range(steps):
        state, m = step(state, frozen, batch)
        losses.append((float(m["loss"]), float(m["grad_norm"])))
    return state, [l for l, _ in losses] if adam else losses


def test_full_finetune_loss_falls_and_matches_reference():
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch()
    state, losses = run_steps(None, 1, 15, batch, params, None)
    assert losses[0] == pytest.approx(reference_loss(params, batch), rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_unrolled_layer_loop_trains_the_same():
    """model.scan_unroll changes how the layer loop is compiled, not what it computes."""
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch()
    # SGD: Adam's first steps would magnify float-order differences of near-zero gradients
    s1, l1 = run_steps(None, 1, 3, batch, params, None, opt=optax.sgd(0.5))
    s2, l2 = run_steps(None, 1, 3, batch, params, None, opt=optax.sgd(0.5), scan_unroll=CFG.n_layers)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)  # losses and grad norms
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1["trainable"], s2["trainable"])
    # the trainer's layout for an unrolled loop (per-layer arrays) is the same unrolled computation
    s3, l3 = run_steps(None, 1, 3, batch, M.unstack_layers(params), None, opt=optax.sgd(0.5),
                       scan_unroll=CFG.n_layers)
    assert isinstance(s3["trainable"]["layers"], list) and len(s3["trainable"]["layers"]) == CFG.n_layers
    np.testing.assert_allclose(l3, l2, rtol=1e-6)  # the grad norm sums its leaves in another order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), M.stack_layers(s3["trainable"]),
                 s2["trainable"])

    def loops(unroll):
        spec = TL.StepSpec(CFG, None, "none", 1, 16, scan_unroll=unroll)
        step = jax.jit(functools.partial(TL.train_step, spec, optax.sgd(0.5)))
        return step.lower(TL.init_state(params, optax.sgd(0.5), 0), None, batch).as_text().count("stablehlo.while")

    # the layer loop (forward and backward) is gone; the loss's loop over sequence chunks remains
    assert loops(CFG.n_layers) == loops(1) - 2


@pytest.mark.parametrize("weight_decay,clip", [(0.1, 0.05), (0.0, None)])
def test_fused_adamw_equals_optax_chain(weight_decay, clip):
    """make_optimizer's fused AdamW is optax's clip_by_global_norm -> adamw(mask=no decay on norms)."""
    tc = train_cfg(lr=1e-2, schedule="cosine", warmup_steps=2, steps=6, weight_decay=weight_decay, grad_clip=clip)
    parts = [optax.clip_by_global_norm(clip)] if clip else []
    ref = optax.chain(*parts, optax.adamw(TL.lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
                                          weight_decay=weight_decay, mask=TL.decay_mask))
    ours = TL.make_optimizer(tc)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    p_ref, s_ref, p_ours, s_ours = params, ref.init(params), params, ours.init(params)
    for i in range(5):  # gradients of varying size: clipping is active in some steps only
        g = jax.tree.map(lambda x: (x + 0.01) * (0.3 + i) * ((-1) ** i), params)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), p_ours, p_ref)
    mu_ref = s_ref[-1][0].mu
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), s_ours.mu, mu_ref)
    assert int(s_ours.count) == 5
    # train_step hands it the gradient sum and 1 / token count: the same update as the mean gradient
    g_sum, n = jax.tree.map(lambda x: x * 37.0, g), 37.0
    u_mean, st_mean = ours.update(g, s_ours, p_ours)
    u_sum, st_sum = ours.update(g_sum, s_ours, p_ours, grad_scale=1.0 / n)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12), (u_sum, st_sum),
                 (u_mean, st_mean))
    # the norms' scales were not decayed: with decay they would differ from a no-decay run
    if weight_decay:
        nodecay = TL.make_optimizer(train_cfg(lr=1e-2, schedule="cosine", warmup_steps=2, steps=6, grad_clip=clip))
        u_nd, _ = nodecay.update(g, s_ours._replace(count=s_ours.count - 1), p_ours)
        u_d, _ = ours.update(g, s_ours._replace(count=s_ours.count - 1), p_ours)
        np.testing.assert_array_equal(u_nd["final_norm"]["scale"], u_d["final_norm"]["scale"])
        assert not np.array_equal(u_nd["lm_head"]["kernel"], u_d["lm_head"]["kernel"])


def test_lora_trains_only_adapters():
    spec = M.LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "down"))
    params = M.init_params(CFG, jax.random.key(0))["params"]
    before = jax.tree.map(np.asarray, params)
    adapters = lora_lib.init_lora(CFG, spec, jax.random.key(1))
    batch = make_batch()
    state, losses = run_steps(spec, 1, 15, batch, adapters, params)
    assert losses[-1] < 0.7 * losses[0]
    # the base is untouched and has no optimizer state; only the targeted adapters exist and moved
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
    assert set(state["trainable"]["layers"]["attention"]) == {"q", "v"}
    assert set(state["trainable"]["layers"]["mlp"]) == {"down"}
    opt_leaves = jax.tree.leaves(state["opt_state"])
    assert sum(x.size for x in opt_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(adapters)) + 16
    assert float(jnp.abs(state["trainable"]["layers"]["attention"]["q"]["b"]).max()) > 0


def test_micro_batches_equal_one_big_batch():
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch(B=8)
    # uneven trained-token counts across micro-batches: token weighting must still match
    mask = np.asarray(batch["loss_mask"]).copy()
    mask[:2, :] = 0
    mask[2, 5:] = 0
    batch["loss_mask"] = jnp.asarray(mask)
    # plain SGD so parameters move by the gradient itself (Adam would magnify float noise in ~0 grads)
    s1, l1 = run_steps(None, 1, 3, batch, params, None, optax.sgd(0.5))
    s4, l4 = run_steps(None, 4, 3, batch, params, None, optax.sgd(0.5))
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 s1["trainable"], s4["trainable"])


def test_lr_schedule_warmup_and_decay():
    sched = TL.lr_schedule(train_cfg(steps=100, lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1))
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(9)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1)
    lin = TL.lr_schedule(train_cfg(steps=20, lr=1.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.0))
    assert float(lin(10)) == pytest.approx(0.5)


def test_weight_decay_skips_norms():
    params = M.init_params(CFG, jax.random.key(0))["params"]
    mask = TL.decay_mask(params)
    assert mask["layers"]["attention_norm"]["scale"] is False and mask["final_norm"]["scale"] is False
    assert mask["layers"]["attention"]["q"]["kernel"] is True and mask["lm_head"]["kernel"] is True
