"""The decoder against HF transformers' MistralForCausalLM, the 12B shapes, and config parsing.

Parity runs on tiny random models saved with `save_pretrained` (fp32), loaded through both published
layouts: HF's, and Mistral's consolidated one written by an independent converter (reference/).
"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import MistralConfig

from nemo_jax import checkpoint
from nemo_jax.checkpoint import layout
from nemo_jax.config import PRESETS, from_hf_config, from_params_json
from nemo_jax.errors import UserError
from nemo_jax.model import abstract_variables, count_params, logits
from reference.hf_mistral import hf_logits, save_random_hf, write_mistral_from_hf

REF = Path(__file__).parent / "reference" / "mistral-nemo-2407"
SEQ = 520  # > 512 so that rope at long distances matters
KV_HEADS = (1, 2, 4)  # MQA, GQA, MHA with 4 query heads; head_dim 24 != dim / heads = 16


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kv_heads -> (hf dir, mistral dir, tokens, HF's logits)."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokens = np.random.default_rng(0).integers(0, 256, (2, SEQ))
    out = {}
    for k in KV_HEADS:
        hf = save_random_hf(root / f"hf{k}", seed=k, num_key_value_heads=k)
        out[k] = (hf, write_mistral_from_hf(hf, root / f"mistral{k}"), tokens, hf_logits(hf, tokens))
    return out


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_logits_match_transformers(tiny_models, kv_heads, fmt):
    hf, mistral, tokens, want = tiny_models[kv_heads]
    config, params = checkpoint.load(hf if fmt == "hf" else mistral)
    assert (config.n_kv_heads, config.head_dim, config.rope_theta, config.param_dtype) == (kv_heads, 24, 1e6, "float32")
    got = np.asarray(logits(config, params, tokens))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)
    assert np.abs(want).max() > 1.0  # the comparison is not between two near-zero tensors


def test_packed_documents_equal_each_document_alone(tiny_models):
    hf, _, tokens, _ = tiny_models[2]
    config, params = checkpoint.load(hf)
    lengths = (300, 200)  # + 20 padding tokens (segment 0)
    docs = [tokens[0, :lengths[0]], tokens[1, :lengths[1]]]
    packed = np.concatenate(docs + [np.zeros(20, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(20)])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(20, int)])[None]
    got = np.asarray(logits(config, params, packed, positions, segments))
    start = 0
    for doc in docs:
        alone = np.asarray(logits(config, params, doc[None]))[0]
        np.testing.assert_allclose(got[0, start:start + len(doc)], alone, atol=1e-5, rtol=0)
        start += len(doc)
    # And without segment ids the second document does see the first: the test can fail.
    mixed = np.asarray(logits(config, params, packed, positions))
    assert np.abs(mixed[0, lengths[0]:sum(lengths)] - got[0, lengths[0]:sum(lengths)]).max() > 1e-2


def _tensor_list(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            out.append((name, tuple(int(d) for d in re.findall(r"\d+", shape))))
    return out


def test_12b_shapes_and_parameter_count():
    config = PRESETS["mistral-nemo-12b"]
    params = abstract_variables(config)["params"]  # eval_shape: nothing allocated
    assert count_params(params) == 12_247_782_400 == config.num_params
    for leaf in layout.LEAVES:
        assert layout.get_path(params, leaf.path).shape == layout.stacked_shape(leaf, config), leaf.key()
    assert len(jax.tree.leaves(params)) == len(layout.LEAVES)
    # The name tables produce exactly the published checkpoints' tensors and shapes.
    for fmt, listing in (("hf", "hf-tensors.txt"), ("mistral", "mistral-tensors.txt")):
        ours = {name: layout.source_shape(leaf, config) for leaf, _, name in layout.tensor_names(fmt, config)}
        assert ours == dict(_tensor_list(REF / listing)), fmt


def test_published_configs_give_the_12b_preset():
    preset = PRESETS["mistral-nemo-12b"]
    hf = from_hf_config(json.loads((REF / "config.json").read_text()))
    mistral = from_params_json(json.loads((REF / "params.json").read_text()))
    # max_seq_len only bounds training sequence lengths; the HF config advertises 1024000 positions.
    assert hf.max_seq_len == 1024000
    assert hf.replace(max_seq_len=preset.max_seq_len) == preset
    assert mistral == preset


def test_transformers_5_config_form():
    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=24, rope_theta=123456.0,
                        sliding_window=None, tie_word_embeddings=False).to_dict()
    assert "rope_parameters" in cfg and "rope_theta" not in cfg
    c = from_hf_config(cfg)
    assert (c.rope_theta, c.n_kv_heads, c.head_dim, c.hidden_dim) == (123456.0, 1, 24, 96)


@pytest.mark.parametrize("field, value", [("sliding_window", 4096), ("tie_word_embeddings", True),
                                          ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                          ("model_type", "llama")])
def test_hf_config_refuses_what_changes_the_maths(field, value):
    cfg = json.loads((REF / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(UserError, match=field if field != "model_type" else "architecture"):
        from_hf_config(cfg)


@pytest.mark.parametrize("field, value", [("sliding_window", 4096), ("tied_embeddings", True), ("moe", {"n": 8})])
def test_params_json_refuses_what_changes_the_maths(field, value):
    p = json.loads((REF / "params.json").read_text())
    p[field] = value
    with pytest.raises(UserError, match=field):
        from_params_json(p)
