"""DPO (train.objective: dpo): the per-pair loss against the paper's formula on transformers'
MistralForCausalLM log-probabilities (each side its own unpacked row, as TRL batches them), at
initialisation and after one AdamW step in both frameworks; preference masks against the
tokenizer's rendering of the prompt alone; the LoRA reference; a training run and eval.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from nemo_jax import preference as PF
from nemo_jax import train_loop as TL
from nemo_jax.config import ModelConfig
from nemo_jax.errors import UserError
from nemo_jax.run_config import load_config
from nemo_jax.tokenizer import load_tokenizer
from reference.hf_grads import params_from_hf
from reference.hf_mistral import save_random_hf

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24)
CONFIG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=96,
                     dtype="float32", param_dtype="float32")
BETA, SMOOTH = 0.5, 0.1
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def call(name, args):
    return {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function",
                                                 "function": {"name": name, "arguments": json.dumps(args)}}]}


def random_pairs(n, seed=0):
    """Pairs of token lists: a shared prompt, then two different answers (lengths vary)."""
    rng = np.random.default_rng(seed)
    sides = []
    for _ in range(n):
        p = rng.integers(0, 256, rng.integers(4, 12))
        c, r = rng.integers(0, 256, rng.integers(3, 9)), rng.integers(0, 256, rng.integers(3, 9))
        ic, ir = np.concatenate([p, c]), np.concatenate([p, r])
        sides.append((ic, np.arange(len(ic)) >= len(p), ir, np.arange(len(ir)) >= len(p)))
    return PF.Pairs(sides, [f"pair {i}" for i in range(n)], "random")


def torch_dpo_loss(policy, reference, pairs):
    """Mean per-pair loss: -(1-ls) log sigmoid(beta * h) - ls log sigmoid(-beta * h), h the difference of
    the chosen and rejected log-ratios, each log-prob the sum over that answer's tokens (Rafailov et al.,
    cDPO smoothing), every side run as its own row."""
    def logps(model, ids, mask):
        x = torch.as_tensor(ids[None, :-1], dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)[0]
        tok = logp.gather(-1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]
        return (tok * torch.as_tensor(mask[1:], dtype=torch.float32)).sum()

    losses = []
    for ic, mc, ir, mr in pairs.sides:
        with torch.no_grad():
            rc, rr = logps(reference, ic, mc), logps(reference, ir, mr)
        h = (logps(policy, ic, mc) - rc) - (logps(policy, ir, mr) - rr)
        losses.append(-(1 - SMOOTH) * torch.nn.functional.logsigmoid(BETA * h)
                      - SMOOTH * torch.nn.functional.logsigmoid(-BETA * h))
    return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_random_hf(tmp_path_factory.mktemp("dpo_model") / "hf", seed=5, **TINY)


def test_loss_matches_torch_at_init_and_after_a_step(hf_dir):
    load = lambda: AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,  # noqa: E731
                                                        attn_implementation="eager").eval()
    policy, reference = load(), load()
    for p in reference.parameters():
        p.requires_grad_(False)
    # A different reference, so that the log-ratios (and rewards) are not zero at initialisation.
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.9)
    pairs = random_pairs(4)
    batch = PF.materialize(pairs, list(range(4)), 40, 0)
    params = jax.tree.map(jnp.asarray, params_from_hf(policy.state_dict(), 2, 4, 2, 24))
    ref_params = jax.tree.map(jnp.asarray, params_from_hf(reference.state_dict(), 2, 4, 2, 24))
    spec = TL.StepSpec(CONFIG, None, "none", 2, 16, dpo=TL.DpoSpec(BETA, SMOOTH))  # 2 micro-batches
    tc = load_config(ROOT / "configs/tiny.yaml", ["train.lr=1e-3", "train.eps=1e-4", "train.grad_clip=null",
                                                  "train.schedule=constant", "train.weight_decay=0"]).train
    opt = TL.make_optimizer(tc)

    want = torch_dpo_loss(policy, reference, pairs)
    want_value = float(want.detach())
    loss_of = jax.jit(lambda p: (lambda t, s: t / s["count"])(*TL.dpo_sums(spec, p, ref_params, batch, None)))
    assert float(loss_of(params)) == pytest.approx(want_value, rel=1e-5)
    assert abs(want_value - math.log(2)) > 1e-3  # the reference differs: not the trivial value

    state = TL.init_state(params, opt, 0)
    state, metrics = jax.jit(lambda s: TL.train_step(spec, opt, s, ref_params, batch))(state)
    assert float(metrics["loss"]) == pytest.approx(want_value, rel=1e-5)
    torch_opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(tc.beta1, tc.beta2), eps=1e-4, weight_decay=0)
    want.backward()
    torch_opt.step()
    after = float(torch_dpo_loss(policy, reference, pairs))
    assert abs(after - want_value) > 1e-3  # the step moved the loss
    assert float(loss_of(state["trainable"])) == pytest.approx(after, rel=1e-4)


def test_masks_cover_exactly_the_answers():
    tok = load_tokenizer()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": "Which unit?"}, {"role": "user", "content": "Celsius."}]
    rec = {"messages": prompt, "tools": TOOLS, "chosen": call("get_weather", {"city": "Oslo"}),
           "rejected": call("get_weather", {"city": "Paris"})}
    ids_c, m_c, ids_r, m_r = PF.encode_pair(tok, rec)
    head = tok.encode_chat_prompt(prompt, TOOLS)
    for ids, mask in ((ids_c, m_c), (ids_r, m_r)):
        assert ids[:len(head)] == head
        assert mask == [False] * len(head) + [True] * (len(ids) - len(head))
        assert ids[-1] == tok.eos_id and ids[len(head)] == tok.special_id("[TOOL_CALLS]")
    # the string form is a user prompt and two text answers
    s = PF.encode_pair(tok, {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."})
    assert s[0][:len(tok.encode_chat_prompt([{"role": "user", "content": "Hi"}]))] == \
        tok.encode_chat_prompt([{"role": "user", "content": "Hi"}])
    batch = PF.materialize(PF.Pairs([tuple(np.asarray(x) for x in (ids_c, m_c, ids_r, m_r))], ["r"], "r"),
                           [0, None], 256, tok.pad_id)
    for seg, ids in ((1, ids_c), (2, ids_r)):
        on = (batch["segment_ids"][0] == seg)
        assert on.sum() == len(ids) - 1
        assert batch["loss_mask"][0][on].sum() == len(ids) - len(head)  # the answer's tokens, </s> included
        np.testing.assert_array_equal(batch["targets"][0][on][batch["loss_mask"][0][on] > 0], ids[len(head):])
    assert batch["loss_mask"][1].sum() == 0


def test_lora_reference_is_the_base():
    from nemo_jax import lora as lora_lib
    from nemo_jax import model as M

    lspec = M.LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "down"))
    params = M.init_params(CONFIG, jax.random.key(1))["params"]
    adapters = lora_lib.init_lora(CONFIG, lspec, jax.random.key(2))
    spec = TL.StepSpec(CONFIG, lspec, "none", 1, 16, dpo=TL.DpoSpec(0.1, 0.0))
    batch = PF.materialize(random_pairs(3, seed=1), [0, 1, 2], 40, 0)
    total, stats = jax.jit(lambda a: TL.dpo_sums(spec, a, params, batch, None))(adapters)
    assert float(total / stats["count"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(stats["rewards_chosen"]) == float(stats["rewards_rejected"]) == 0.0
    # adapters that change the model give rewards: the reference is the base alone
    moved = jax.tree.map(lambda x: x + 0.05, adapters)
    _, stats = jax.jit(lambda a: TL.dpo_sums(spec, a, params, batch, None))(moved)
    assert abs(float(stats["rewards_chosen"])) > 1e-4


def write_pairs(path, n, seed=0):
    rng = np.random.default_rng(seed)
    cities = ["Oslo", "Paris", "Tokyo", "Lima", "Cairo"]
    with open(path, "w") as f:
        for _ in range(n):
            city, other = rng.choice(cities, 2, replace=False)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Weather in {city}?"}], "tools": TOOLS,
                                "chosen": call("get_weather", {"city": str(city)}),
                                "rejected": call("get_weather", {"city": str(other)})}) + "\n")
    return path


def test_dpo_run_writes_reward_metrics_and_eval_cli_reports_them(tmp_path):
    from nemo_jax.trainer import train

    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    held = write_pairs(tmp_path / "held.jsonl", 5, seed=1)
    out = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={out}", f"data.train=[{pairs}]", f"data.eval=[{held}]", "checkpoint.async_save=false",
        "train.objective=dpo", "train.steps=2", "train.seq_len=512", "train.eval_every=1", "lora.enabled=true",
        "lora.rank=4", "dpo.beta=0.2"]))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "split" not in r]
    evals = [r for r in recs if r.get("split") == "held"]
    assert len(steps) == 2 and [r["step"] for r in evals] == [0, 1, 2]
    for r in steps + evals:
        assert set(TL.REWARD_METRICS) <= set(r)
        assert r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"], abs=1e-6)
    assert evals[0]["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6) and evals[0]["pairs"] == 5
    assert evals[-1]["reward_margin"] != 0.0

    res = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(out), "--data", str(held), "--out", str(res)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(res.read_text())["held"]
    assert "reward accuracy" in r.stdout and m["pairs"] == 5
    assert m["reward_margin"] == pytest.approx(evals[-1]["reward_margin"], rel=1e-4, abs=1e-6)


def test_bad_preference_records_name_file_and_line(tmp_path):
    tok = load_tokenizer()
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "No."})
    cases = {
        "{not json": "malformed JSON",
        json.dumps({"prompt": "Hi", "chosen": "Hello."}): "needs 'chosen' and 'rejected'",
        json.dumps({"prompt": "Hi", "chosen": {"role": "user", "content": "x"}, "rejected": "No."}):
            "'chosen' must be an assistant message",
        json.dumps({"prompt": "Hi", "chosen": "a " * 300, "rejected": "No."}): "more than train.seq_len",
    }
    for line, reason in cases.items():
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(UserError) as e:
            PF.load_pairs(str(bad), tok, 128)
        msg = str(e.value)
        assert msg.startswith(f"{bad}:2: ") and reason in msg and "\n" not in msg, msg
    assert len(PF.load_pairs(str(bad), tok, 128, skip_bad_records=True)) == 1


def test_planner_counts_the_full_fine_tuning_reference():
    from nemo_jax import model as M
    from nemo_jax.plan import compile_step

    def arguments(objective):
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"train.objective={objective}"])
        return compile_step(cfg).compiled.memory_analysis().argument_size_in_bytes, cfg

    (sft, cfg), (dpo, _) = arguments("sft"), arguments("dpo")
    from nemo_jax.trainer import model_config_for

    params = M.count_params(M.abstract_variables(model_config_for(cfg))["params"]) * 4  # float32
    assert dpo - sft == params  # the frozen copy of the starting weights, nothing else
