"""KV-cache generation: the decode mask, greedy against the full forward and against HF transformers'
`generate`, padding and batching, per-row stopping, sampling, LoRA."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import nemo_jax
from nemo_jax import lora as lora_lib
from nemo_jax import model as M
from nemo_jax.attention import new_token_mask
from nemo_jax.config import preset
from nemo_jax.errors import UserError
from nemo_jax.generate import generate
from reference.hf_mistral import save_random_hf

CFG = preset("tiny")
PROMPT_LENGTHS = (7, 19, 1, 12)
NEW = 10


@pytest.fixture(scope="module")
def params():
    return M.init_params(CFG, jax.random.key(0))["params"]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def full_forward_greedy(params, prompts, n):
    """Step-by-step argmax of the full forward, no cache: rows right-padded to one fixed length
    (causal attention: what follows a position cannot change its logits), one compiled shape."""
    seqs = [list(p) for p in prompts]
    width = max(map(len, seqs)) + n
    for _ in range(n):
        tokens = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = s
        logits = np.asarray(M.logits(CFG, params, tokens))
        for b, s in enumerate(seqs):
            s.append(int(logits[b, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_new_token_mask_literal():
    # Row 0: a padding token, then three real ones; row 1: four real tokens.
    got = np.asarray(new_token_mask(np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)))[:, 0].astype(int)
    np.testing.assert_array_equal(got[0], [[1, 0, 0, 0],  # the padding query sees only itself
                                           [0, 1, 0, 0],
                                           [0, 1, 1, 0],
                                           [0, 1, 1, 1]])
    np.testing.assert_array_equal(got[1], np.tril(np.ones((4, 4), int)))


def test_prefill_and_decode_logits_equal_the_full_forward(params, prompts):
    tokens = np.array([prompts[1][:16]])
    want = np.asarray(M.logits(CFG, params, tokens))
    step = jax.jit(lambda p, t, decoding: M.forward(CFG, p, t, decoding=decoding))  # (a pytree: a jit argument)
    got, cache = step(params, tokens[:, :10], M.Decoding(M.init_cache(CFG, 1, 32), 0))
    np.testing.assert_allclose(np.asarray(got), want[:, :10], atol=1e-5, rtol=0)
    for t in range(10, 16):
        got, cache = step(params, tokens[:, t:t + 1], M.Decoding(cache, t))
        np.testing.assert_allclose(np.asarray(got)[:, 0], want[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_greedy_equals_full_forward_argmax_and_batching_changes_nothing(params, prompts, padding):
    want = full_forward_greedy(params, prompts, NEW)
    batched = generate(CFG, params, prompts, NEW, eos_id=None, padding=padding)
    assert batched == want
    alone = [generate(CFG, params, [p], NEW, eos_id=None, padding=padding)[0] for p in prompts]
    assert alone == want


def test_each_row_stops_at_its_own_eos(params, prompts):
    full = generate(CFG, params, prompts, NEW, eos_id=None)
    eos = full[0][3]  # row 0 makes this token at step 3; the others may later or never
    got = generate(CFG, params, prompts, NEW, eos_id=eos)
    for row, g in zip(full, got):
        want = row[:row.index(eos) + 1] if eos in row else row
        assert g == want
    assert got[0][-1] == eos and len(got[0]) == 4
    assert nemo_jax.generate(CFG, params, prompts[:1], 0) == [[]]


def test_sampling_is_reproducible_and_top_k_1_or_tiny_top_p_is_greedy(params, prompts):
    greedy = generate(CFG, params, prompts, NEW, eos_id=None)
    a = generate(CFG, params, prompts, NEW, temperature=1.0, seed=3, eos_id=None)
    assert a == generate(CFG, params, prompts, NEW, temperature=1.0, seed=3, eos_id=None)
    assert a != generate(CFG, params, prompts, NEW, temperature=1.0, seed=4, eos_id=None)
    assert a != greedy
    assert generate(CFG, params, prompts, NEW, temperature=0.8, top_k=1, seed=5, eos_id=None) == greedy
    assert generate(CFG, params, prompts, NEW, temperature=0.8, top_p=1e-6, seed=5, eos_id=None) == greedy


def test_lora_adapter_equals_merged_weights(params, prompts):
    spec = M.LoraSpec(rank=4, alpha=8.0)
    rng = np.random.default_rng(3)  # numpy: random A and B (B is zero at init), with no compiles
    adapters = jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                            M.abstract_variables(CFG, spec)["lora"])
    got = generate(CFG, params, prompts, NEW, eos_id=None, lora_params=adapters, lora=spec)
    assert got == generate(CFG, lora_lib.merge(params, adapters, spec), prompts, NEW, eos_id=None)
    assert got != generate(CFG, params, prompts, NEW, eos_id=None)  # the adapter matters


def test_bad_arguments_are_user_errors(params):
    for kwargs, match in [(dict(prompts=[[]]), "empty"), (dict(prompts=[[CFG.vocab_size]]), "token ids"),
                          (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(max_new_tokens=CFG.max_seq_len), "max_seq_len")]:
        args = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
        with pytest.raises(UserError, match=match):
            generate(CFG, params, **args)


def test_greedy_equals_transformers_generate(tmp_path):
    hf_dir = save_random_hf(tmp_path / "hf", seed=7, num_key_value_heads=2)
    config, params = nemo_jax.load(hf_dir)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 256, n).tolist() for n in (9, 4, 15)]
    got = generate(config, params, prompts, 12, eos_id=2)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == ours


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from nemo_jax import model as M, sharding as S
    from nemo_jax.config import preset
    from nemo_jax.generate import generate
    c = preset("tiny").replace(n_heads=8, n_kv_heads=4, head_dim=16)
    params = M.init_params(c, jax.random.key(0))["params"]
    prompts = [np.random.default_rng(i).integers(3, c.vocab_size, n).tolist() for i, n in enumerate((5, 17, 9))]
    mesh = S.make_mesh(fsdp=2, tensor=4)
    shardings = S.tree_shardings(M.logical_axes(c)["params"], M.abstract_variables(c)["params"], mesh)
    sharded = jax.device_put(params, shardings)
    assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded)) >= 7
    assert generate(c, sharded, prompts, 8, eos_id=None) == generate(c, params, prompts, 8, eos_id=None)
""")


def test_sharded_params_generate_the_same_tokens():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
