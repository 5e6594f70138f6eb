"""FP8 quantisation-aware training: rounding vectors, scaling state, STE, the train step, hf-fp8
export checked against transformers + compressed-tensors, and FP8 checkpoints read back."""

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nemo_jax import fp8 as F8
from nemo_jax import lora as lora_lib
from nemo_jax import model as M
from nemo_jax import train_loop as TL
from nemo_jax.config import preset
from nemo_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "tests/fixtures/data/tiny_train.jsonl"
EVAL = ROOT / "tests/fixtures/data/tiny_eval.jsonl"
CFG = preset("tiny")


def f32(*v):
    return jnp.asarray(v, jnp.float32)


# --- rounding ----------------------------------------------------------------------------------------


def test_e4m3_vectors_saturate_and_round_to_even():
    one = jnp.float32(1.0)
    got = np.asarray(F8.qdq(f32(448, 500, -500, 1e9, 1.0625, 1.1875, 17, 19, 0.0), one, F8.E4M3))
    np.testing.assert_array_equal(got, [448, 448, -448, 448, 1.0, 1.25, 16, 20, 0.0])
    # a plain cast is what the clip prevents: beyond the range e4m3fn has only NaN
    assert np.isnan(np.asarray(f32(500).astype(F8.E4M3).astype(jnp.float32)))[0]
    # scaled: 2 with scale 2/448 is 448 in FP8 and 2 again after dequantisation
    s = jnp.float32(2 / 448)
    assert float(F8.quantize(f32(2.0), s)[0].astype(jnp.float32)) == 448.0
    assert float(F8.qdq(f32(2.0), s)[0]) == pytest.approx(2.0, rel=1e-7)


def test_e5m2_output_gradient_vectors():
    scale = jnp.float32(1.0)

    def f(y):
        return F8.quantize_output_grad(y, scale, jnp.zeros(()), False, 0)

    _, vjp = jax.vjp(f, jnp.zeros(4))
    (g,) = vjp(f32(1e6, 1.125, -1e6, 3.0))
    np.testing.assert_array_equal(np.asarray(g), [57344, 1.0, -57344, 3.0])


def test_scale_from_amax_and_history_rolling():
    meta = F8.new_meta(3)
    assert float(meta["scale"]) == 1.0  # the initial scale
    meta = F8.update_meta(meta, 2.0, F8.E4M3, 0)
    assert float(meta["scale"]) == pytest.approx(2 / 448)
    np.testing.assert_array_equal(np.asarray(meta["amax_history"]), [2, 0, 0])
    for a in (1.0, 0.5, 0.25):
        meta = F8.update_meta(meta, a, F8.E4M3, 0)
    np.testing.assert_array_equal(np.asarray(meta["amax_history"]), [0.25, 0.5, 1.0])  # 2 rolled out
    assert float(meta["scale"]) == pytest.approx(1 / 448)  # max over the window
    m = F8.update_meta(F8.new_meta(4), 3.0, F8.E5M2, 2)  # margin 2^2, e5m2's max
    assert float(m["scale"]) == pytest.approx(3.0 * 4 / 57344)


def test_nan_or_zero_amax_keeps_the_scale_without_freezing_it():
    meta = F8.update_meta(F8.new_meta(2), 4.0, F8.E4M3, 0)
    before = float(meta["scale"])
    meta = F8.update_meta(meta, jnp.nan, F8.E4M3, 0)
    assert float(meta["scale"]) == before and np.isfinite(np.asarray(meta["amax_history"])).all()
    meta = F8.update_meta(meta, jnp.inf, F8.E4M3, 0)  # the window is now [0, 0]: the scale is kept
    assert float(meta["scale"]) == before
    meta = F8.update_meta(meta, 1.0, F8.E4M3, 0)  # and the next real amax moves it again
    assert float(meta["scale"]) == pytest.approx(1 / 448)
    assert float(F8.compute_scale(jnp.float32(0.0), jnp.float32(0.5))) == 0.5


# --- differentiable pieces -----------------------------------------------------------------------------


def test_straight_through_gradients():
    x = f32(0.3, -2.0, 1000.0)  # 1000 saturates: its gradient still passes unchanged
    c = f32(1.0, 2.0, 3.0)
    g = jax.grad(lambda x: jnp.sum(F8.quantize_input(x, jnp.float32(1.0), 0.0) * c))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))
    g = jax.grad(lambda w: jnp.sum(F8.quantize_weight(w, jnp.float32(1.0)) * c))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


def test_probe_gradient_is_amax_and_reuse_combines_by_max():
    spec = F8.Fp8Spec(amax_history=4)

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            lin = M.Linear((4,), (3,), ("embed", "mlp"), jnp.float32, jnp.float32, fp8=spec, name="lin")
            return lin(x) + lin(3.0 * x)  # one module, two calls: one set of variables

    x = jnp.linspace(-1.0, 2.0, 8).reshape(2, 4)
    v = Twice().init(jax.random.key(0), x)
    probes = jax.tree.map(jnp.zeros_like, v["fp8_obs"])

    def loss(p):
        return jnp.sum(Twice().apply({**v, "fp8_obs": F8.as_probes(p)}, x) * 1e-3)

    obs = jax.jit(jax.grad(loss))(probes)["lin"]
    assert float(obs["x"]) == pytest.approx(6.0)  # max(2, 3 * 2), not the sum 8
    assert float(obs["g"]) == pytest.approx(1e-3)  # dy is 1e-3 everywhere, in both calls


# --- the train step ------------------------------------------------------------------------------------


def make_batch(B=4, T=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, size=(B, T + 1))
    return {"tokens": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
            "loss_mask": jnp.ones((B, T), jnp.float32), "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def run_qat(spec, n_micro, steps, batch, params, lora=None, trainable=None, fp8_state=None, scan_unroll=1):
    opt = optax.adam(1e-2)
    step_spec = TL.StepSpec(CFG, lora, "none", n_micro, 16, spec, scan_unroll=scan_unroll)
    trainable = params if trainable is None else trainable
    state = TL.init_state(trainable, opt, 0, fp8_state or M.init_fp8(CFG, spec, lora)[0])
    step = jax.jit(functools.partial(TL.train_step, step_spec, opt))
    frozen = params if lora is not None else None
    states, losses = [], []
    for _ in range(steps):
        state, m = step(state, frozen, batch)
        states.append(jax.tree.map(np.asarray, state["fp8"]))
        losses.append(float(m["loss"]))
    return states, losses


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_qat_loss_falls_and_state_moves(recipe):
    spec = F8.Fp8Spec(recipe=recipe, amax_history=4)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    states, losses = run_qat(spec, 1, 12, make_batch(), params)
    assert losses[-1] < 0.6 * losses[0]
    q = [s["layers"]["attention"]["q"] for s in states]
    assert (q[0]["x"]["scale"] != 1.0).all() and (q[0]["g"]["scale"] != 1.0).all()
    np.testing.assert_array_equal(q[1]["x"]["amax_history"][:, 1], q[0]["x"]["amax_history"][:, 0])  # rolled
    assert not np.array_equal(q[1]["g"]["scale"], q[-1]["g"]["scale"])  # gradients shrink as it learns
    assert not np.array_equal(q[0]["x"]["amax_history"][:, 0], q[-1]["x"]["amax_history"][:, 0])


def test_qat_on_per_layer_params():
    """An unrolled run's per-layer params (model.unstack_layers) with the FP8 state stacked: the
    same losses and the same amax observations as the stacked params."""
    spec = F8.Fp8Spec(amax_history=4)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch()
    s1, l1 = run_qat(spec, 1, 1, batch, params, scan_unroll=CFG.n_layers)
    s2, l2 = run_qat(spec, 1, 1, batch, M.unstack_layers(params), scan_unroll=CFG.n_layers)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s2, s1)


def test_micro_batches_keep_the_max_amax():
    spec = F8.Fp8Spec(amax_history=4)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch(B=4)
    batch["tokens"] = batch["tokens"].at[2:].set(5)  # the micro-batches see different activations
    one, _ = run_qat(spec, 1, 1, batch, params)
    two, _ = run_qat(spec, 2, 1, batch, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), one[0], two[0])
    # and that max is not any one micro-batch's own
    half, _ = run_qat(spec, 1, 1, jax.tree.map(lambda x: x[2:], batch), params)
    a1 = one[0]["layers"]["mlp"]["down"]["x"]["amax_history"][:, 0]
    ah = half[0]["layers"]["mlp"]["down"]["x"]["amax_history"][:, 0]
    assert (a1 >= ah).all() and (a1 > ah).any()


def test_lora_qat_frozen_fp8_base():
    spec = F8.Fp8Spec(amax_history=4, base_fp8=True)
    lora = M.LoraSpec(rank=4, alpha=8.0)
    params = M.init_params(CFG, jax.random.key(0))["params"]
    state0 = M.init_fp8(CFG, spec, lora)[0]
    qparams, qstate = F8.quantize_base(params, state0, spec)
    k, q = params["layers"]["mlp"]["up"]["kernel"], qparams["layers"]["mlp"]["up"]["kernel"]
    assert q.dtype == F8.E4M3 and q.nbytes * 4 == k.nbytes  # a quarter of fp32 (half of bf16)
    s = qstate["layers"]["mlp"]["up"]["weight_scale"][:, None, None]
    np.testing.assert_array_equal(np.asarray(F8.dequantize(q, s)), np.asarray(F8.qdq(k, s)))  # bitwise
    # q, k and v share one scale; gate and up another
    sc = qstate["layers"]["attention"]
    np.testing.assert_array_equal(np.asarray(sc["q"]["weight_scale"]), np.asarray(sc["v"]["weight_scale"]))
    # an untrained adapter (B = 0) on the FP8 base is the FP8 model itself
    adapters = lora_lib.init_lora(CFG, lora, jax.random.key(1))
    toks = make_batch()["tokens"]
    ev = dataclasses.replace(spec, quantize_grads=False)
    with_lora = M.forward(CFG, qparams, toks, adapters=M.Adapters(lora, adapters), fp8=M.Fp8Scaling(ev, qstate))
    plain_spec = dataclasses.replace(ev, base_fp8=False)
    strip = lambda d: {k: strip(v) for k, v in d.items() if k != "weight_scale"} if isinstance(d, dict) else d
    plain = M.forward(CFG, params, toks, fp8=M.Fp8Scaling(plain_spec, strip(qstate)))
    np.testing.assert_allclose(np.asarray(with_lora), np.asarray(plain), atol=2e-5)
    # it trains: only the adapters move, the e4m3 base stays as it is
    states, losses = run_qat(spec, 1, 10, make_batch(), qparams, lora, adapters, qstate)
    assert losses[-1] < 0.7 * losses[0]
    np.testing.assert_array_equal(states[-1]["layers"]["mlp"]["up"]["weight_scale"],
                                  np.asarray(qstate["layers"]["mlp"]["up"]["weight_scale"]))
    assert qparams["layers"]["mlp"]["up"]["kernel"].dtype == F8.E4M3


# --- runs, export, import ------------------------------------------------------------------------------


def train(out, *overrides):
    from nemo_jax.run_config import load_config
    from nemo_jax.trainer import train as run

    return run(load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", f"data.train=[{TRAIN}]",
                                                         "checkpoint.async_save=false", *overrides]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    base = tmp / "base"
    train(base, "train.steps=3")
    qat = tmp / "qat"
    train(qat, "model.preset=null", f"model.checkpoint={base}", "lora.enabled=true", "lora.rank=4",
          "train.lr=1e-2", "train.steps=4", "fp8.enabled=true", "fp8.store_base=true", "fp8.amax_history=8")
    full = tmp / "full"
    train(full, "model.preset=null", f"model.checkpoint={base}", "train.steps=3", "fp8.enabled=true",
          "fp8.recipe=current")
    return base, qat, full


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_hf_fp8_export_loads_in_transformers_with_our_logits(runs, tmp_path, kind):
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_jax.checkpoint import load
    from nemo_jax.checkpoint.fp8_io import load_fp8_export
    from nemo_jax.checkpoint.safetensors_io import SafetensorsFile
    from nemo_jax.evaluate import load_fp8_for_eval
    from nemo_jax.checkpoint.runs import load_run

    qat = runs[2] if kind == "full" else runs[1]
    out = tmp_path / "fp8"
    subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(qat), str(out), "--format", "hf-fp8",
                    "--dtype", "float32"], check=True, cwd=ROOT, capture_output=True)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    f = SafetensorsFile(out / "model-00001-of-00001.safetensors")
    assert f.entries["model.layers.0.self_attn.q_proj.weight"].dtype.name == "float8_e4m3fn"
    assert f.entries["model.layers.0.mlp.down_proj.input_scale"].shape == (1,)
    assert f.entries["lm_head.weight"].dtype == np.float32 and f.entries["model.embed_tokens.weight"].dtype == np.float32
    ws = {t: f.read(f"model.layers.1.{n}.weight_scale")[0] for t, n in
          (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"))}
    assert ws["q"] == ws["k"] == ws["v"]  # one scale for the fused qkv GEMM

    # fp8(W) x weight_scale == qdq(W) bitwise, W the run's merged float32 weight
    from nemo_jax.checkpoint.runs import RunSource
    from nemo_jax.checkpoint import layout

    src = RunSource(qat)
    leaf = next(l for l in layout.LEAVES if l.path == ("layers", "mlp", "up", "kernel"))
    w = src.read_leaf(leaf, "float32")[1]  # [D, F]
    s = f.read("model.layers.1.mlp.up_proj.weight_scale")[0]
    stored = f.read("model.layers.1.mlp.up_proj.weight").astype(np.float32) * s  # [F, D]
    np.testing.assert_array_equal(stored, np.asarray(F8.qdq(jnp.asarray(w), jnp.float32(s))).T)

    # transformers + compressed-tensors runs the export as an FP8 model; its logits are ours
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    toks = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(torch.tensor(toks)).logits.numpy()
    config, params, spec, state = load_fp8_export(out)
    ours = M.forward(config.replace(dtype="float32"), params, jnp.asarray(toks), fp8=M.Fp8Scaling(spec, state))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    # a full fine-tune's own FP8-simulated forward (eval.py on the run directory) is the export's;
    # a LoRA run's adds its adapter in high precision on the FP8 base, and the export merges it first
    config, params, lora_params, lspec = load_run(qat)
    params, (espec, estate) = load_fp8_for_eval(str(qat), params)
    run = M.forward(config, params, jnp.asarray(toks), adapters=M.Adapters.of(lspec, lora_params),
                    fp8=M.Fp8Scaling(espec, estate))
    if kind == "full":
        np.testing.assert_allclose(np.asarray(run), ref, atol=1e-4)
    else:  # the merge moves some weights across an e4m3 rounding boundary: close, not equal
        assert np.median(np.abs(np.asarray(run) - ref)) < 0.05
    # the unquantised model differs clearly: the comparisons above can fail
    if kind == "full":
        _, plain_params, _, _ = load_run(qat)
        plain = M.forward(config, plain_params, jnp.asarray(toks))
        assert np.abs(np.asarray(plain) - ref).max() > 1e-2

    # nemo_jax.load reads the FP8 checkpoint dequantised (fp8 x scale)
    _, loaded = load(out)
    k = np.asarray(loaded["layers"]["mlp"]["up"]["kernel"][1])
    np.testing.assert_array_equal(k, stored.T)


def test_eval_cli_simulates_fp8(runs, tmp_path):
    qat = runs[1]
    res = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(qat), "--data", str(EVAL), "--out", str(res),
                        "--seq-len", "64"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "FP8 model" in p.stdout and np.isfinite(json.loads(res.read_text())["tiny_eval"]["loss"])


def test_ptq_export_needs_and_uses_calibration(runs, tmp_path):
    base = runs[0]
    out = tmp_path / "ptq"
    cmd = [sys.executable, "-m", "nemo_jax.convert", "export", str(base), str(out), "--format", "hf-fp8"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "--calibration-data" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    p = subprocess.run(cmd + ["--calibration-data", str(TRAIN), "--calibration-batches", "2",
                              "--calibration-seq-len", "64"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    from nemo_jax.checkpoint.safetensors_io import SafetensorsFile

    f = SafetensorsFile(out / "model-00001-of-00001.safetensors")
    x = [float(f.read(f"model.layers.{i}.self_attn.o_proj.input_scale")[0]) for i in range(CFG.n_layers)]
    assert all(0 < s < 1 for s in x) and x[0] != x[1]


def _fake_fp8_checkpoint(src: Path, out: Path, form: str):
    """Rewrite an hf-fp8 export's config as vLLM's `quant_method: fp8` form or a bad variant."""
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    if form == "vllm":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    elif form == "block":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    elif form == "int4":
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    (out / "config.json").write_text(json.dumps(cfg))


def test_fp8_checkpoints_read_back(runs, tmp_path):
    from nemo_jax.checkpoint import load

    qat = runs[1]
    out = tmp_path / "fp8"
    subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(qat), str(out), "--format", "hf-fp8"],
                   check=True, cwd=ROOT, capture_output=True)
    _, a = load(out)
    _fake_fp8_checkpoint(out, tmp_path / "vllm", "vllm")
    _, b = load(tmp_path / "vllm")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert a["layers"]["attention"]["q"]["kernel"].dtype == jnp.bfloat16
    # import to orbax: a bf16 nemo_jax checkpoint of the dequantised weights
    orb = tmp_path / "orbax"
    subprocess.run([sys.executable, "-m", "nemo_jax.convert", "import", str(tmp_path / "vllm"), str(orb)],
                   check=True, cwd=ROOT, capture_output=True)
    _, c = load(orb)
    jax.tree.map(np.testing.assert_array_equal, a, c)
    for form, msg in (("block", "block-wise"), ("int4", "8-bit float")):
        _fake_fp8_checkpoint(out, tmp_path / form, form)
        with pytest.raises(UserError, match=msg):
            load(tmp_path / form)


def test_fp8_config_errors(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}",
                        "--set", "fp8.enabled=true", "--set", "fp8.store_base=true"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "fp8.store_base" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}",
                        "--set", "fp8.targets=[q,x]"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "fp8.targets" in p.stderr


def test_qat_resume_is_exact(tmp_path):
    def losses(run_dir):
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r and "split" not in r]

    common = ("fp8.enabled=true", "fp8.amax_history=4", "train.schedule=constant", "train.log_every=1")
    train(tmp_path / "full", *common, "train.steps=6")
    train(tmp_path / "part", *common, "train.steps=3")
    train(tmp_path / "part", *common, "train.steps=6")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    # resuming that run without FP8 (its checkpoint has a scaling state this run has not): a clear error
    with pytest.raises(UserError, match="resuming would change what the checkpoint means: fp8.enabled true -> false"):
        train(tmp_path / "part", "train.schedule=constant", "train.steps=8")
    from nemo_jax.checkpoint.runs import load_run_fp8

    a, b = load_run_fp8(tmp_path / "full")[1], load_run_fp8(tmp_path / "part")[1]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert float(np.asarray(a["layers"]["mlp"]["up"]["g"]["amax_history"]).min()) > 0  # 4 steps in the window


def test_forward_only_qat_leaves_gradients_unrounded(tmp_path):
    """fp8.quantize_grads=false: the forward is the FP8 deployment's, the backward is plain."""
    params = M.init_params(CFG, jax.random.key(0))["params"]
    batch = make_batch()
    fwd = F8.Fp8Spec(amax_history=4, quantize_grads=False)
    state = M.init_fp8(CFG, fwd, None)[0]
    q = state["layers"]["attention"]["q"]
    assert "x" in q and "g" not in q  # no e5m2 state to carry or checkpoint
    full = F8.Fp8Spec(amax_history=4)

    def grads(spec, fp8_state):
        step_spec = TL.StepSpec(CFG, None, "none", 1, 16, spec)
        st = TL.init_state(params, optax.sgd(1.0), 0, fp8_state)
        new, _ = jax.jit(functools.partial(TL.train_step, step_spec, optax.sgd(1.0)))(st, None, batch)
        return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                            params, new["trainable"])

    # same step from the same state: the only difference is the e5m2 rounding of dy (scale 1 at step 0)
    g_fwd = grads(fwd, state)
    g_full = grads(full, M.init_fp8(CFG, full, None)[0])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_fwd), jax.tree.leaves(g_full)))
    assert diff > 0
    # and through the config: a forward-only QAT run trains, and its checkpointed state has no g sites
    train(tmp_path / "fo", "fp8.enabled=true", "fp8.quantize_grads=false", "fp8.amax_history=4", "train.steps=2")
    from nemo_jax.checkpoint.runs import load_run_fp8

    st = load_run_fp8(tmp_path / "fo")[1]
    assert "g" not in st["layers"]["mlp"]["up"] and float(np.asarray(st["layers"]["mlp"]["up"]["x"]["scale"]).max()) != 1.0


def test_distillation_loss_is_the_kl_from_the_unquantised_model(tmp_path):
    """fp8.distill: the step's loss is KL(unquantised teacher || FP8 student); it falls as the FP8
    model is trained towards the teacher; LoRA distils from its base; bad combinations are config errors."""
    params = M.init_params(CFG, jax.random.key(0))["params"]
    teacher = jax.tree.map(jnp.copy, params)
    batch = make_batch()
    spec = F8.Fp8Spec(amax_history=4, quantize_grads=False, recipe="current")
    state0 = M.init_fp8(CFG, spec, None)[0]
    # the reference: full-vocabulary KL between the plain and the FP8-simulated forward
    fwd = jax.jit(lambda p, fp8: jax.nn.log_softmax(M.forward(CFG, p, batch["tokens"], fp8=fp8), -1))
    t_logp, s_logp = fwd(params, None), fwd(params, M.Fp8Scaling(spec, state0))  # (a pytree: a jit argument)
    ref = float(jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)))
    assert ref > 0
    opt = optax.adam(1e-4)  # a QAT learning rate: larger Adam steps add more error than they remove
    step_spec = TL.StepSpec(CFG, None, "none", 1, 16, spec, distill=True)
    step = jax.jit(functools.partial(TL.train_step, step_spec, opt))
    state = TL.init_state(params, opt, 0, state0)
    losses = []
    for _ in range(8):
        state, m = step(state, teacher, batch)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(ref, rel=1e-3)
    assert losses[-1] < 0.7 * losses[0]
    # LoRA: the teacher is the base without adapters; untrained adapters (B = 0) start from the same KL
    lora = M.LoraSpec(rank=4, alpha=8.0)
    lspec = TL.StepSpec(CFG, lora, "none", 1, 16, spec, distill=True)
    lstate = TL.init_state(lora_lib.init_lora(CFG, lora, jax.random.key(1)), opt, 0, state0)
    _, m = jax.jit(functools.partial(TL.train_step, lspec, opt))(lstate, teacher, batch)
    assert float(m["loss"]) == pytest.approx(ref, rel=1e-3)
    for bad, msg in ((("fp8.distill=true",), "needs fp8.enabled"),
                     (("fp8.enabled=true", "fp8.distill=true", "fp8.store_base=true", "lora.enabled=true"),
                      "fp8.store_base")):
        with pytest.raises(UserError, match=msg):
            train(tmp_path / "bad", *bad)
