"""LoRA merge and PEFT export against HF PEFT on the HF export of the same base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nemo_jax
from nemo_jax import lora as lora_lib
from nemo_jax import model as M
from tests.reference.hf_mistral import save_random_hf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = save_random_hf(tmp_path_factory.mktemp("hf") / "base", num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24)
    config, params = nemo_jax.load(path)
    return path, config, params


def random_adapters(config, spec, seed=0):
    """Adapters with B != 0 (a trained adapter), so every target changes the output."""
    adapters = lora_lib.init_lora(config, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x, adapters)


TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 40))


@pytest.mark.parametrize("targets", [M.LORA_TARGETS, ("q", "v"), ("o", "down")])
def test_peft_export_matches_hf_peft(base, tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, config, params = base
    spec = M.LoraSpec(rank=4, alpha=8.0, targets=targets)
    adapters = random_adapters(config, spec)
    ours = np.asarray(M.logits(config, params, TOKENS, lora_params=adapters, lora=spec))
    plain = np.asarray(M.logits(config, params, TOKENS))
    assert np.abs(ours - plain).max() > 1e-2  # the adapters matter

    lora_lib.export_peft(tmp_path / "peft", adapters, spec, str(path))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(hf, tmp_path / "peft")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_merge_equals_adapted_forward(base):
    _, config, params = base
    spec = M.LoraSpec(rank=4, alpha=8.0)
    adapters = random_adapters(config, spec, seed=3)
    merged = lora_lib.merge(params, adapters, spec)
    np.testing.assert_allclose(np.asarray(M.logits(config, merged, TOKENS)),
                               np.asarray(M.logits(config, params, TOKENS, lora_params=adapters, lora=spec)),
                               atol=1e-4)
    # untargeted weights are untouched
    assert merged["embed"]["embedding"] is params["embed"]["embedding"]
