"""INT8 QLoRA base (nemo_jax/int8.py) against bitsandbytes' LLM.int8() weight format (its CPU path)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nemo_jax import int8

bnb = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_dequantize_equal_bitsandbytes(dtype):
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((96, 320)).astype(np.float32) * 0.02).to(dtype)
    w[3] = 0  # an all-zero row
    w[5, 7] = 0.5  # an outlier: it only sets its row's scale (no outlier columns at threshold 0)
    cb, scb, outliers = bnb.int8_vectorwise_quant(w.clone())
    assert outliers is None
    q, ours = int8.quantize_rows(jnp.asarray(w.float().numpy()))
    keep = np.arange(96) != 3  # bitsandbytes divides the zero row by 0; ours stays 0
    np.testing.assert_array_equal(np.asarray(q)[keep], cb.numpy()[keep])
    np.testing.assert_array_equal(np.asarray(q)[3], 0)
    np.testing.assert_array_equal(np.asarray(ours), scb.numpy())
    np.testing.assert_array_equal(np.asarray(int8.dequantize_rows(q, ours))[keep],
                                  bnb.int8_vectorwise_dequant(cb, scb).numpy()[keep])
    assert np.abs(np.asarray(q, np.int32)).max() == 127


def test_kernel_layout_round_trip():
    """Our [L, *in, *out] kernels (o's two input axes included) quantise per layer as torch's [out, in]."""
    rng = np.random.default_rng(1)
    for in_shape, out_shape in [((64,), (8, 16)), ((8, 16), (64,))]:
        k = rng.standard_normal((2, *in_shape, *out_shape)).astype(np.float32)
        q = int8.quantize_kernel(jnp.asarray(k), len(in_shape))
        assert q["int8"].shape == (2, 64 * 128) and q["scb"].shape == (2, int(np.prod(out_shape)))
        torch_w = torch.from_numpy(k[1].reshape(int(np.prod(in_shape)), -1).T.copy())
        cb, scb, _ = bnb.int8_vectorwise_quant(torch_w)
        np.testing.assert_array_equal(np.asarray(q["int8"][1]), cb.numpy().reshape(-1))
        back = int8.dequantize_kernel({"int8": q["int8"][1], "scb": q["scb"][1]}, in_shape, out_shape, jnp.float32)
        np.testing.assert_allclose(np.asarray(back), k[1], atol=np.abs(k[1]).max() / 127)


# ---- the INT8 base in the model, in a run, and from a checkpoint bitsandbytes quantised ----------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

import nemo_jax  # noqa: E402
from nemo_jax import model as M  # noqa: E402
from nemo_jax import quant_base as QB  # noqa: E402
from nemo_jax.errors import UserError  # noqa: E402
from nemo_jax.run_config import load_config  # noqa: E402
from tests.reference.hf_mistral import hf_logits, save_random_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INT8 = QB.BaseQuant("int8")


def _dequantized_hf(path, out):
    """The HF checkpoint with each projection replaced by bitsandbytes' LLM.int8() round trip of it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                cb, scb, _ = bnb.int8_vectorwise_quant(m.weight.detach().clone())
                m.weight.copy_(bnb.int8_vectorwise_dequant(cb, scb))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    path = save_random_hf(tmp / "base", vocab_size=1280, intermediate_size=128, head_dim=32)
    config, params = nemo_jax.load(path)
    return tmp, path, config, params, _dequantized_hf(path, tmp / "dequantized")


def test_int8_model_equals_transformers_on_the_dequantized_weights(base):
    _, path, config, params, dequantized = base
    q = jax.jit(QB.quantize_params, static_argnums=(1, 2))(params, M.LORA_TARGETS, INT8)
    assert q["layers"]["attention"]["o"]["int8"].dtype == jnp.int8 and "kernel" not in q["layers"]["mlp"]["up"]
    tokens = np.random.default_rng(0).integers(0, 1280, (2, 40))
    got = np.asarray(M.logits(config, q, tokens))
    np.testing.assert_allclose(got, hf_logits(dequantized, tokens), atol=1e-4)
    assert np.abs(got - np.asarray(M.logits(config, params, tokens))).max() > 1e-4  # INT8 changed the model


def test_int8_qlora_run_trains_and_its_peft_export_loads_in_peft(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemo_jax.checkpoint.runs import load_run
    from nemo_jax.trainer import train

    _, path, config, params, dequantized = base
    run = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={run}", f"data.train=[{ROOT / 'tests/fixtures/data/tiny_train.jsonl'}]",
        "checkpoint.async_save=false", "model.preset=null", f"model.checkpoint={path}", "lora.enabled=true",
        "lora.rank=4", "lora.quantize_base=int8", "train.steps=5", "train.lr=1e-2", "train.schedule=constant"]))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in recs if "loss" in r and "split" not in r]
    assert len(loss) == 5 and loss[-1] < loss[0] - 0.05, loss
    r = subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(run), str(tmp_path / "peft"),
                        "--format", "peft"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    q = jax.jit(QB.quantize_params, static_argnums=(1, 2))(params, M.LORA_TARGETS, INT8)
    tokens = np.random.default_rng(1).integers(0, 1280, (2, 24))
    ours = np.asarray(M.logits(config, q, tokens, lora_params=load_run(run)[2], lora=M.LoraSpec(rank=4, alpha=32.0)))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32),
                                         tmp_path / "peft").eval()
        np.testing.assert_allclose(peft(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)


def test_bitsandbytes_8bit_checkpoint_loads_as_is(base):
    """transformers' load_in_8bit save: its int8 weights and SCB become our base unchanged, and our logits are
    transformers' fp32 model's on bitsandbytes' dequantisation of them."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nemo_jax import sharding as S
    from nemo_jax.trainer import make_step_setup, model_config_for, restore_quantized_base

    tmp, path, config, params, _ = base
    hf = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                              device_map="cpu", dtype=torch.float32)
    hf.save_pretrained(tmp / "bnb8")
    overrides = ["model.preset=null", f"model.checkpoint={tmp / 'bnb8'}", "lora.enabled=true", "lora.rank=4"]
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides + ["lora.quantize_base=int8"])
    setup = make_step_setup(cfg, model_config_for(cfg), S.make_mesh())
    q = restore_quantized_base(cfg.model.checkpoint, setup, "float32")
    sd = hf.state_dict()
    np.testing.assert_array_equal(np.asarray(q["layers"]["mlp"]["down"]["int8"][1]),
                                  sd["model.layers.1.mlp.down_proj.weight"].numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q["layers"]["mlp"]["down"]["scb"][1]),
                                  sd["model.layers.1.mlp.down_proj.SCB"].numpy())
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, m in plain.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(bnb.int8_vectorwise_dequant(sd[f"{name}.weight"], sd[f"{name}.SCB"]))
        tokens = np.random.default_rng(2).integers(0, 1280, (2, 32))
        theirs = plain(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(M.logits(config, q, tokens)), theirs, atol=1e-4)
    plain_config, dequantized = nemo_jax.load(tmp / "bnb8")  # eval.py, convert: the model bitsandbytes computes
    np.testing.assert_allclose(np.asarray(M.logits(plain_config, dequantized, tokens)), theirs, atol=1e-4)
    nf4 = load_config(ROOT / "configs/tiny.yaml", overrides + ["lora.quantize_base=nf4"])
    with pytest.raises(UserError, match="bitsandbytes int8; set lora.quantize_base: int8"):
        restore_quantized_base(nf4.model.checkpoint, make_step_setup(nf4, model_config_for(nf4), S.make_mesh()),
                               "float32")
    with pytest.raises(UserError, match="lora.double_quant: quantises NF4"):
        load_config(ROOT / "configs/tiny.yaml", overrides + ["lora.quantize_base=int8", "lora.double_quant=true"])
