"""QLoRA: NF4 against bitsandbytes (its CPU path), the NF4 model against transformers on the same
dequantised weights, and a QLoRA run from an HF checkpoint whose PEFT export loads in PEFT."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nemo_jax
from nemo_jax import model as M
from nemo_jax import nf4
from nemo_jax import quant_base as QB
from nemo_jax.run_config import load_config
from tests.reference.hf_mistral import hf_state, save_random_hf

bnb = pytest.importorskip("bitsandbytes.functional")
ROOT = Path(__file__).resolve().parent.parent
HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def test_code_tables_are_bitsandbytes():
    np.testing.assert_array_equal(bnb.get_4bit_type("nf4", device="cpu").numpy(), nf4.NF4_CODE)
    np.testing.assert_array_equal(bnb.create_dynamic_map(signed=True).numpy(), nf4.DYNAMIC_CODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64 * 96, 64 * 301 + 40])  # a ragged last block
def test_quantize_and_dequantize_equal_bitsandbytes(dtype, n):
    w = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.02).to(dtype)
    x = jnp.asarray(w.float().numpy()).astype(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = jax.jit(nf4.quantize_flat, static_argnums=1)(x, False)
    np.testing.assert_array_equal(np.asarray(ours["codes"]), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours["absmax"]), state.absmax.numpy())
    want = bnb.dequantize_4bit(packed, state).float().numpy().reshape(-1)
    got = jax.jit(nf4.dequantize_flat, static_argnums=(1, 2))(ours, n, x.dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
    assert len(np.unique(packed.numpy())) > 100  # both nibbles take many values


@pytest.mark.parametrize("n", [64 * 1024, 64 * 301 + 40])
def test_double_quant_equals_bitsandbytes(n):
    w = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.02)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = {"codes": jnp.asarray(packed.numpy().reshape(-1)), "absmax": jnp.asarray(state.absmax.numpy()),
              "nested_absmax": jnp.asarray(state.state2.absmax.numpy()), "offset": jnp.float32(state.offset.item())}
    # dequantising bitsandbytes' own tensors (what a bnb-4bit checkpoint holds) is bit-exact
    np.testing.assert_array_equal(np.asarray(nf4.dequantize_flat(theirs, n, jnp.float32)),
                                  bnb.dequantize_4bit(packed, state).numpy().reshape(-1))
    ours = jax.jit(nf4.quantize_flat, static_argnums=1)(jnp.asarray(w.numpy()), True)
    np.testing.assert_array_equal(np.asarray(ours["codes"]), packed.numpy().reshape(-1))
    # The offset is the absmaxes' mean: ours is correctly rounded, torch's is a float32 reduction
    # whose order (vectorised, cascaded) we do not replay, so the two may differ by an ulp or so.
    np.testing.assert_allclose(float(ours["offset"]), state.offset.item(), rtol=3e-7)
    np.testing.assert_allclose(np.asarray(ours["nested_absmax"]), state.state2.absmax.numpy(), rtol=3e-6)
    # The 8-bit absmax codes: bitsandbytes' C++ CPU kernel (a binary search, then the nearer of two
    # neighbours) can land one level off the nearest, and the offset moves values near a midpoint.
    qa, ba = np.asarray(ours["absmax"]), state.absmax.numpy()
    off = np.nonzero(qa != ba)[0]
    assert len(off) <= max(2, len(qa) // 100), off
    assert np.all(np.abs(qa[off].astype(int) - ba[off].astype(int)) == 1)


def _dequantized_hf(path, params, targets, out):
    """The HF checkpoint with each targeted weight replaced by bitsandbytes' NF4 round trip of it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if any(f".{HF_MODULE[x]}.weight" in name for x in targets):
                p, s = bnb.quantize_4bit(t.contiguous(), blocksize=64, quant_type="nf4")
                t.copy_(bnb.dequantize_4bit(p, s))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    # every in-feature count a multiple of 64, as in real models: bitsandbytes' C++ CPU dequantiser
    # treats a block as lying within one row (torch's out index) and is wrong otherwise
    path = save_random_hf(tmp / "base", vocab_size=1280, intermediate_size=128, head_dim=32)
    config, params = nemo_jax.load(path)
    return tmp, path, config, params, _dequantized_hf(path, params, M.LORA_TARGETS, tmp / "dequantized")


def test_nf4_model_equals_transformers_on_the_dequantized_weights(base):
    from tests.reference.hf_mistral import hf_logits

    _, path, config, params, dequantized = base
    q = jax.jit(QB.quantize_params, static_argnums=(1, 2))(params, M.LORA_TARGETS, QB.BaseQuant("nf4"))
    assert q["layers"]["mlp"]["down"]["codes"].dtype == jnp.uint8 and "kernel" not in q["layers"]["mlp"]["down"]
    tokens = np.random.default_rng(0).integers(0, 1280, (2, 48))
    got = np.asarray(M.logits(config, q, tokens))
    np.testing.assert_allclose(got, hf_logits(dequantized, tokens), atol=1e-4)
    assert np.abs(got - np.asarray(M.logits(config, params, tokens))).max() > 1e-2  # NF4 changed the model


def test_qlora_run_trains_and_its_peft_export_loads_in_peft(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemo_jax.trainer import train

    _, path, config, params, dequantized = base
    run = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={run}", f"data.train=[{ROOT / 'tests/fixtures/data/tiny_train.jsonl'}]",
        "checkpoint.async_save=false", "model.preset=null", f"model.checkpoint={path}", "lora.enabled=true",
        "lora.rank=4", "lora.quantize_base=nf4", "lora.double_quant=false", "train.steps=6", "train.lr=1e-2",
        "train.schedule=constant", f"data.eval=[{ROOT / 'tests/fixtures/data/tiny_eval.jsonl'}]",
        "train.eval_every=6"]))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in recs if "loss" in r and "split" not in r]
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.05, loss
    # eval.py scores the run on the NF4 base it trained on: the run's own last eval, not the bf16 base's
    in_run = [r["eval_loss"] for r in recs if r.get("split") == "tiny_eval"][-1]
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(run), "--data",
                        str(ROOT / "tests/fixtures/data/tiny_eval.jsonl"), "--out", str(tmp_path / "eval.json")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["tiny_eval"]["loss"] == pytest.approx(in_run, rel=1e-5)

    r = subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(run), str(tmp_path / "peft"),
                        "--format", "peft"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # PEFT on the bf16 base's NF4 round trip (bitsandbytes') is our NF4 model with the run's adapters
    from nemo_jax.checkpoint.runs import load_run

    spec = M.LoraSpec(rank=4, alpha=32.0)
    adapters = load_run(run)[2]
    q = jax.jit(QB.quantize_params, static_argnums=(1, 2))(params, M.LORA_TARGETS, QB.BaseQuant("nf4"))
    tokens = np.random.default_rng(1).integers(0, 1280, (2, 24))
    ours = np.asarray(M.logits(config, q, tokens, lora_params=adapters, lora=spec))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32),
                                         tmp_path / "peft").eval()
        np.testing.assert_allclose(peft(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)
    assert np.abs(ours - np.asarray(M.logits(config, q, tokens))).max() > 1e-3  # the adapters moved


def test_bitsandbytes_4bit_checkpoint_loads_as_is(base):
    """A checkpoint quantised and saved by transformers + bitsandbytes: its NF4 tensors become our
    base unchanged, and our model's logits are transformers' own 4-bit model's."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nemo_jax.trainer import make_step_setup, restore_quantized_base

    tmp, path, config, params, _ = base
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config, device_map="cpu",
                                              attn_implementation="eager").eval()
    hf.save_pretrained(tmp / "bnb4")
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "model.preset=null", f"model.checkpoint={tmp / 'bnb4'}", "lora.enabled=true", "lora.rank=4",
        "lora.quantize_base=nf4", "lora.double_quant=true"])
    from nemo_jax import sharding as S
    from nemo_jax.trainer import model_config_for

    setup = make_step_setup(cfg, model_config_for(cfg), S.make_mesh())
    q = restore_quantized_base(cfg.model.checkpoint, setup, "float32")
    want = hf.state_dict()["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(np.asarray(q["layers"]["mlp"]["down"]["codes"][1]), want.numpy().reshape(-1))
    # the reference: transformers' fp32 model on bitsandbytes' dequantisation of the 4-bit weights
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    modules = dict(hf.named_modules())
    with torch.no_grad():
        for name, m in plain.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                w = modules[name].weight
                m.weight.copy_(bnb.dequantize_4bit(w.data, w.quant_state).float())
        tokens = np.random.default_rng(2).integers(0, 1280, (2, 32))
        theirs = plain(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(M.logits(config, q, tokens)), theirs, atol=1e-4)
    plain_config, dequantized = nemo_jax.load(tmp / "bnb4")  # eval.py, convert: the model bitsandbytes computes
    np.testing.assert_allclose(np.asarray(M.logits(plain_config, dequantized, tokens)), theirs, atol=1e-4)


def test_nf4_base_from_a_training_run(tmp_path):
    """A full fine-tuning run as the QLoRA base: its weights read a leaf at a time (only the leaves asked
    for), quantised as one device quantises the whole run."""
    from nemo_jax import sharding as S
    from nemo_jax.trainer import make_step_setup, model_config_for, restore_quantized_base, train

    run = tmp_path / "full"
    train(load_config(ROOT / "configs/tiny.yaml", [f"output_dir={run}", "train.steps=1", "checkpoint.async_save=false",
                                                   f"data.train=[{ROOT / 'tests/fixtures/data/tiny_train.jsonl'}]"]))
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.preset=null", f"model.checkpoint={run}", "lora.enabled=true",
                                                   "lora.quantize_base=nf4"])
    got = restore_quantized_base(run, make_step_setup(cfg, model_config_for(cfg), S.make_mesh()), None)
    want = jax.jit(QB.quantize_params, static_argnums=(1, 2))(nemo_jax.load(run)[1], M.LORA_TARGETS,
                                                                QB.BaseQuant("nf4"))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
