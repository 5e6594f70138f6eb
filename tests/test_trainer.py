"""train.py end to end on the tiny preset: metrics, exact resume, interruption, LoRA runs, eval.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nemo_jax.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = "tests/fixtures/data/tiny_train.jsonl"
EVAL = "tests/fixtures/data/tiny_eval.jsonl"


def cfg_for(out, *overrides):
    return load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", f"data.train=[{ROOT / TRAIN}]",
                                                     "checkpoint.async_save=false", *overrides])


def losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "split" not in r}


def run_train(cfg):
    from nemo_jax.trainer import train

    return train(cfg)


def test_metrics_and_outputs(tmp_path):
    out = tmp_path / "run"
    run_train(cfg_for(out, f"data.eval=[{ROOT / EVAL}]", "train.eval_every=2"))
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "split" not in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for r in train_recs:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    evals = [r for r in recs if "split" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and {r["split"] for r in evals} == {"tiny_eval"}
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tb").iterdir())
    assert (out / "checkpoints" / "4").is_dir()
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["n_layers"] == 2 and info["lora"] is None


def test_resume_is_exact(tmp_path):
    """Resume gives the uninterrupted run's losses. Unrolled (model.scan_unroll >= n_layers, as the
    demo runs), the step works on per-layer arrays but checkpoints keep the stacked layout: a
    rolled run (scan_unroll 1) resumes from them too."""
    common = ("train.schedule=constant", "train.steps=5", "model.scan_unroll=2")
    full = losses(run_train(cfg_for(tmp_path / "full", *common)))
    part = tmp_path / "part"
    run_train(cfg_for(part, "train.schedule=constant", "train.steps=3", "model.scan_unroll=2"))
    shutil.copytree(part, tmp_path / "rolled")
    # a save that was killed midway leaves only orbax's temporary directory: resume must skip it
    shutil.copytree(part / "checkpoints" / "3", part / "checkpoints" / "4.orbax-checkpoint-tmp")
    run_train(cfg_for(part, *common))
    b = losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5]
    assert [b[s] for s in range(1, 6)] == [full[s] for s in range(1, 6)]
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(part / "checkpoints" / "5" / "state")
    tree = getattr(meta, "item_metadata", meta)
    assert tuple(tree["trainable"]["layers"]["mlp"]["up"]["kernel"].shape)[0] == 2  # stacked [L, ...]
    run_train(cfg_for(tmp_path / "rolled", "train.schedule=constant", "train.steps=5", "model.scan_unroll=1"))
    np.testing.assert_allclose([losses(tmp_path / "rolled")[s] for s in (4, 5)], [full[4], full[5]], rtol=1e-4)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    run_train(cfg_for(base, "train.steps=2"))
    lora_dir = tmp / "lora"
    run_train(load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={lora_dir}", f"data.train=[{ROOT / TRAIN}]", "checkpoint.async_save=false",
        "model.preset=null", f"model.checkpoint={base}", "lora.enabled=true", "lora.rank=4",
        "train.steps=3", "train.lr=1e-2"]))
    return base, lora_dir


def test_lora_run_saves_only_adapters(lora_run):
    base, lora_dir = lora_run
    size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    assert size(lora_dir / "checkpoints") < size(base / "checkpoints") / 3
    info = json.loads((lora_dir / "run.json").read_text())
    assert info["lora"]["rank"] == 4 and info["base"]["checkpoint"] == str(base.absolute())


def test_eval_cli_on_a_lora_run(lora_run, tmp_path):
    _, lora_dir = lora_run
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(lora_dir), "--data", str(ROOT / EVAL),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())["tiny_eval"]
    assert m["tokens"] > 0 and np.isclose(m["perplexity"], np.exp(m["loss"]))
    assert "tiny_eval" in r.stdout


def test_export_lora_run_merged_and_peft(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import nemo_jax

    base, lora_dir = lora_run
    for fmt, src in (("hf", lora_dir), ("peft", lora_dir), ("hf", base)):
        r = subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(src), str(tmp_path / f"{fmt}-{src.name}"),
                            "--format", fmt], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    tokens = np.random.default_rng(0).integers(0, 1280, size=(2, 24))
    config, merged = nemo_jax.load(lora_dir)
    ours = np.asarray(nemo_jax.logits(config, merged, tokens))
    with torch.no_grad():
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-lora", dtype=torch.float32)
        np.testing.assert_allclose(hf_merged(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)
        hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base", dtype=torch.float32)
        peft = PeftModel.from_pretrained(hf_base, tmp_path / "peft-lora").eval()
        np.testing.assert_allclose(peft(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)
    # the adapters moved away from zero, so the merged model is not the base
    _, base_params = nemo_jax.load(base)
    assert np.abs(ours - np.asarray(nemo_jax.logits(config, base_params, tokens))).max() > 1e-3
    r = subprocess.run([sys.executable, "-m", "nemo_jax.convert", "export", str(base), str(tmp_path / "x"),
                        "--format", "peft"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "needs a LoRA training run" in r.stderr


def test_sigint_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", f"output_dir={out}",
           "--set", "train.steps=10000", "--set", "train.schedule=constant"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 130, stdout
    assert "Traceback" not in stdout and "run the same command again to resume" in stdout
    done = max(losses(out))
    assert (out / "checkpoints" / str(done)).is_dir()
    r = subprocess.run(cmd[:-4] + ["--set", f"train.steps={done + 2}", "--set", "train.schedule=constant"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {done}" in r.stdout
    assert max(losses(out)) == done + 2


@pytest.mark.parametrize("override,message", [
    ("train.lr=fast", "train.lr"),
    ("lora.rnak=4", "did you mean lora.rank"),
    ("model.preset=huge", "model.preset"),
])
def test_bad_config_cli(override, message):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set", override],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_data_and_checkpoint_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set",
                        f"output_dir={tmp_path / 'o'}", "--set", f"data.train=[{bad}]"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{bad}:2" in r.stderr
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(tmp_path / "nope"), "--data", EVAL],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope" in r.stderr


def test_eval_on_hf_dir_equals_transformers(tmp_path):
    """eval.py's token-weighted NLL on an HF directory = the same tokens scored by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_jax.tokenizer import load_tokenizer
    from tests.reference.hf_mistral import save_random_hf

    hf_dir = save_random_hf(tmp_path / "hf", vocab_size=1280)
    data = tmp_path / "held.jsonl"
    texts = ["Weather in Oslo: cold, -3 degrees.", "Ciudad de México: soleado, 24 grados. Mañana: lluvia.",
             "東京の天気：晴れ、18度。"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(hf_dir), "--data", str(data), "--out", str(out),
                        "--seq-len", "64", "--batch-size", "2", "--dtype", "float32"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = json.loads(out.read_text())["held"]

    tok = load_tokenizer(vocab_size=1280)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t, bos=True, eos=True)])
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert ours["tokens"] == count
    assert ours["loss"] == pytest.approx(total / count, rel=1e-5)
