"""A resume under settings that change what the checkpoint means stops with one line naming each
change; `nemo_jax.load(path, dtype)` puts parameters and compute in `dtype` for every source."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import nemo_jax
from nemo_jax.errors import UserError
from nemo_jax.run_config import load_config
from nemo_jax.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "tests/fixtures/data/tiny_train.jsonl"
EVAL = ROOT / "tests/fixtures/data/tiny_eval.jsonl"


def cfg_for(out, *overrides):
    return load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", f"data.train=[{TRAIN}]",
                                                     "checkpoint.async_save=false", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(cfg_for(tmp_path_factory.mktemp("resume") / "run", "train.steps=2", "train.schedule=constant"))


def test_resume_names_every_change_that_alters_the_checkpoint(run):
    changes = {"train.batch_size=8": "train.batch_size 4 -> 8", "train.seq_len=32": "train.seq_len 64 -> 32",
               "train.seed=3": "train.seed 0 -> 3", f"data.train=[{EVAL}]": f'data.train ["{TRAIN}"] -> ["{EVAL}"]',
               "model.param_dtype=bfloat16": 'model.param_dtype "float32" -> "bfloat16"',
               "lora.enabled=true": "lora.enabled false -> true", "lora.rank=4": "lora.rank 16 -> 4",
               "fp8.enabled=true": "fp8.enabled false -> true", "fp8.margin=1": "fp8.margin 0 -> 1"}
    with pytest.raises(UserError) as e:
        train(cfg_for(run, "train.steps=3", *changes))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run / 'checkpoints'}/2: resuming would change")
    for said in changes.values():
        assert said in msg, (said, msg)
    # the adapters' settings are only compared when there are adapters; micro_batch_size = batch_size
    # is what an unset one means
    with pytest.raises(UserError) as e:
        train(cfg_for(run, "train.steps=3", "lora.rank=4", "train.micro_batch_size=4", "train.seed=1"))
    assert str(e.value).count(" -> ") == 1 and "train.seed 0 -> 1" in str(e.value)


def test_resume_may_grow_steps_and_change_cadences(run):
    train(cfg_for(run, "train.steps=3", "train.schedule=constant", "train.log_every=3", "train.eval_every=2",
                  "checkpoint.every=1", "checkpoint.keep=2", "model.remat=full"))
    assert (run / "checkpoints" / "3").is_dir()


def test_load_dtype_is_parameters_and_compute_for_every_source(run, tmp_path):
    from nemo_jax import checkpoint as ckpt
    from tests.reference.hf_mistral import save_random_hf

    hf = save_random_hf(tmp_path / "hf", vocab_size=1280)
    orbax = tmp_path / "orbax"
    ckpt.import_checkpoint(ckpt.open_checkpoint(hf), orbax)
    for path in (run, hf, orbax):
        for dtype in ("float32", "bfloat16"):
            config, params = nemo_jax.load(path, dtype=dtype)
            assert (config.dtype, config.param_dtype) == (dtype, dtype), path
            assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.dtype(dtype))}, path
    # the run trained in float32 compute (configs/tiny.yaml): without a dtype, what it was trained in
    assert json.loads((run / "run.json").read_text())["model"]["dtype"] == nemo_jax.load(run)[0].dtype
