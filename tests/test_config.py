"""Run configs: every shipped config loads; every kind of mistake gives its one-line error with the key
path and where it was written; overrides; round trips."""

import json
from pathlib import Path

import pytest
import yaml

from nemo_jax.errors import UserError
from nemo_jax.model import LORA_TARGETS
from nemo_jax.run_config import (
    RunConfig,
    TrainSection,
    config_from_dict,
    load_config,
    parse_source,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

# Line numbers below refer to this text (line 1 is `output_dir`).
BASE = """\
output_dir: outputs/t
model:
  preset: tiny
  dtype: float32
data:
  train:
    - a.jsonl
train:
  steps: 10
  batch_size: 4
  seq_len: 64
  lr: 1.0e-3
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(tmp_path, text, overrides=()) -> str:
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(p), "c.yaml")


def test_configs_dir_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"lora.yaml", "full.yaml", "qat.yaml", "demo_pretrain.yaml", "demo_sft.yaml", "demo_dpo.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_shipped_config_contents():
    lora = load_config("configs/lora.yaml")
    assert lora.lora.enabled and (lora.lora.rank, lora.lora.alpha) == (16, 32.0)
    assert (lora.model.dtype, lora.model.param_dtype, lora.model.remat) == ("bfloat16", "bfloat16", "full")
    assert (lora.train.seq_len, lora.train.batch_size, lora.train.grad_accum_steps) == (8192, 8, 8)
    full = load_config("configs/full.yaml")
    assert not full.lora.enabled and full.mesh.fsdp == 8 and full.model.param_dtype == "float32"
    assert load_config("configs/qat.yaml").fp8.enabled
    demo = load_config("configs/demo_sft.yaml")
    assert demo.model.checkpoint == "data/demo/base" and Path("data/demo/base/config.json").is_file()
    assert not demo.lora.enabled  # full fine-tuning: the base never saw the chat format's control tokens


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.checkpoint is None and cfg.model.dtype == "float32" and cfg.model.param_dtype == "float32"
    assert cfg.model.remat == "none"
    assert cfg.data.eval == () and cfg.data.tokenizer is None and cfg.data.num_proc is None
    t = cfg.train
    assert (t.schedule, t.warmup_steps, t.min_lr_ratio, t.weight_decay) == ("cosine", 0, 0.1, 0.0)
    assert (t.beta1, t.beta2, t.eps, t.grad_clip, t.seed) == (0.9, 0.95, 1e-8, 1.0, 0)
    assert (t.log_every, t.eval_every, t.eval_batches, t.loss_chunk, t.micro_batch_size) == (1, 0, None, 1024, None)
    assert cfg.lora.targets == LORA_TARGETS and not cfg.lora.enabled and cfg.lora.scale == 2.0
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.async_save) == (0, 3, True)
    assert cfg.mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    assert (cfg.fp8.enabled, cfg.fp8.recipe, cfg.fp8.amax_history, cfg.fp8.margin) == (False, "delayed", 1024, 0)


def test_yaml_friendliness(tmp_path):
    text = BASE.replace("lr: 1.0e-3", "lr: 1e-4") + "lora:\nfp8:\n  targets: q\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.lora.rank == 16  # an empty section is all defaults
    assert cfg.fp8.targets == ("q",)  # a string is a one-element list
    assert load_config(write(tmp_path, BASE.replace("lr: 1.0e-3", "lr: 1"))).train.lr == 1.0


# --- errors: (YAML appended to BASE or edit of it, expected message) ----------------------------------

CASES = {
    "unknown key": (BASE + "lora:\n  enabled: true\n  rnak: 4\n",
                    "c.yaml:15: unknown key lora.rnak — did you mean lora.rank?"),
    "unknown key, other section": (BASE + "  rank: 4\n", "c.yaml:13: unknown key train.rank — did you mean lora.rank?"),
    "unknown top key": (BASE + "trian:\n  steps: 3\n", "c.yaml:13: unknown key trian — did you mean train?"),
    "unknown, no suggestion": (BASE + "lora:\n  zzzz: 1\n",
                               "c.yaml:14: unknown key lora.zzzz (expected one of enabled, rank, alpha, dropout, "
                               "targets, quantize_base, double_quant)"),
    "wrong type": (BASE.replace("lr: 1.0e-3", "lr: fast"), "c.yaml:12: train.lr: expected float, got 'fast'"),
    "bool is not int": (BASE.replace("steps: 10", "steps: true"), "c.yaml:9: train.steps: expected int, got true"),
    "bool is not float": (BASE + "  weight_decay: no\n", "c.yaml:13: train.weight_decay: expected float, got false"),
    "float is not int": (BASE.replace("steps: 10", "steps: 10.5"), "c.yaml:9: train.steps: expected int, got 10.5"),
    "not finite": (BASE.replace("lr: 1.0e-3", "lr: .inf"), "c.yaml:12: train.lr: expected a finite float, got inf"),
    "optional": (BASE + "  eval_batches: many\n", "c.yaml:13: train.eval_batches: expected int or null, got 'many'"),
    "bool": (BASE + "lora:\n  enabled: 1\n", "c.yaml:14: lora.enabled: expected true or false, got 1"),
    "> 0": (BASE.replace("steps: 10", "steps: 0"), "c.yaml:9: train.steps: must be > 0, got 0"),
    "> 1": (BASE.replace("seq_len: 64", "seq_len: 1"), "c.yaml:11: train.seq_len: must be > 1, got 1"),
    "[0, 1)": (BASE + "lora:\n  dropout: 1\n", "c.yaml:14: lora.dropout: must be in [0, 1), got 1.0"),
    "[0, 1]": (BASE + "  min_lr_ratio: 1.5\n", "c.yaml:13: train.min_lr_ratio: must be in [0, 1], got 1.5"),
    ">= 0": (BASE + "checkpoint:\n  every: -1\n", "c.yaml:14: checkpoint.every: must be >= 0, got -1"),
    "choice": (BASE + "  schedule: cosin\n",
               "c.yaml:13: train.schedule: expected one of cosine, linear, constant, got 'cosin' — did you mean cosine?"),
    "dtype": (BASE.replace("dtype: float32", "dtype: fp16"),
              "c.yaml:4: model.dtype: expected one of float32, bfloat16, got 'fp16'"),
    "preset": (BASE.replace("preset: tiny", "preset: tiy"), "c.yaml:3: model.preset: expected one of "),
    "remat": (BASE.replace("dtype: float32", "dtype: float32\n  remat: everything"),
              "c.yaml:5: model.remat: expected one of none, full"),
    "scan_unroll": (BASE.replace("dtype: float32", "dtype: float32\n  scan_unroll: 0"),
                    "c.yaml:5: model.scan_unroll: must be >= 1, got 0"),
    "unknown target": (BASE + "lora:\n  targets:\n    - q\n    - qq\n",
                       "c.yaml:16: lora.targets: unknown target 'qq' (choose from q, k, v, o, gate, up, down) — "
                       "did you mean q?"),
    "fp8 target": (BASE + "fp8:\n  targets: [q, embed]\n", "c.yaml:14: fp8.targets: unknown target 'embed'"),
    "duplicate target": (BASE + "lora:\n  targets: [q, v, q]\n", "c.yaml:14: lora.targets: 'q' is listed twice"),
    "empty targets": (BASE + "lora:\n  targets: []\n", "c.yaml:14: lora.targets: must list at least one entry"),
    "missing key": (BASE.replace("  steps: 10\n", ""), "c.yaml:8: missing required key train.steps"),
    "missing keys": (BASE.replace("  steps: 10\n", "").replace("output_dir: outputs/t\n", ""),
                     "c.yaml: missing required keys output_dir, train.steps"),
    "missing section": (BASE.split("\ntrain:\n")[0] + "\n",
                        "c.yaml: missing required keys train.steps, train.batch_size, train.seq_len, train.lr"),
    "empty file": ("", "c.yaml: missing required keys output_dir, data.train, train.steps"),
    "not a mapping": ("- a\n- b\n", "c.yaml: expected a mapping of config keys at the top level, got list"),
    "section not a mapping": (BASE + "lora: 3\n", "c.yaml:13: lora: expected a section (a mapping of keys), got 3"),
    "null required": (BASE.replace("output_dir: outputs/t", "output_dir:"),
                      "c.yaml:1: output_dir: expected str, got null"),
    "empty string": (BASE.replace("output_dir: outputs/t", "output_dir: ''"), "c.yaml:1: output_dir: must not be empty"),
    "yaml syntax": (BASE + "lora:\n rank: 3\n  alpha: 2\n", "c.yaml:15: invalid YAML: mapping values are not allowed"),
    "yaml unclosed": (BASE + "lora:\n  targets: [q, v\n", "c.yaml:15: invalid YAML: expected ',' or ']'"),
    "duplicate key": (BASE + "  lr: 2.0e-3\n", "c.yaml:13: duplicate key train.lr (first set on line 12)"),
    "no model": (BASE.replace("model:\n  preset: tiny\n  dtype: float32\n", ""),
                 "c.yaml: model: set exactly one of model.checkpoint (start from weights) or model.preset"),
    "both model sources": (BASE.replace("preset: tiny", "preset: tiny\n  checkpoint: ckpt"),
                           "c.yaml:3: model: model.checkpoint and model.preset are both set; set exactly one"),
    "micro batch": (BASE + "  micro_batch_size: 3\n",
                    "c.yaml:13: train.micro_batch_size: must divide train.batch_size (4), got 3"),
    "warmup": (BASE + "  warmup_steps: 10\n", "c.yaml:13: train.warmup_steps: must be less than train.steps (10)"),
    "mesh zero": (BASE + "mesh:\n  tensor: 0\n",
                  "c.yaml:14: mesh.tensor: expected a positive int or -1 (all remaining devices), got 0"),
    "mesh two fills": (BASE + "mesh:\n  data: -1\n  fsdp: -1\n",
                       "c.yaml:15: mesh.fsdp: only one mesh axis may be -1; mesh.data already is"),
    "bad weight": (BASE.replace("    - a.jsonl\n", "    - a.jsonl:2\n    - b.jsonl:0\n"),
                   "c.yaml:8: data.train: 'b.jsonl:0': weight must be a positive number, got 0"),
    "weight with a space": (BASE.replace("    - a.jsonl\n", "    - a.jsonl: 2\n"),
                            "c.yaml:7: data.train: item 1: expected a non-empty string, got {'a.jsonl': 2} "
                            "(write 'path:weight' with no space after the colon)"),
    "empty train": (BASE.replace("  train:\n    - a.jsonl\n", "  train: []\n"),
                    "c.yaml:6: data.train: must list at least one entry"),
    "eval weight": (BASE.replace("data:\n", "data:\n  eval: [v.jsonl:2]\n"),
                    "c.yaml:6: data.eval: 'v.jsonl:2': eval files take no weight"),
    "eval split names": (BASE.replace("data:\n", "data:\n  eval: [a/val.jsonl, b/val.jsonl]\n"),
                         "c.yaml:6: data.eval: 'a/val.jsonl' and 'b/val.jsonl' would both report as split 'val'"),
}


@pytest.mark.parametrize("name", CASES)
def test_error(tmp_path, name):
    text, expected = CASES[name]
    assert error(tmp_path, text).startswith(expected)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


# --- overrides ----------------------------------------------------------------------------------------


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["train.lr=1e-5", "lora.targets=[q,v]", "lora.enabled=true", "mesh.fsdp=-1"])
    assert cfg.train.lr == 1e-5 and cfg.lora.targets == ("q", "v") and cfg.lora.enabled and cfg.mesh.fsdp == -1
    assert load_config(p, ["train.lr=1e-5", "train.lr=2e-5"]).train.lr == 2e-5  # the last one wins
    assert load_config(p, ["data.train=b.jsonl:3"]).data.train_sources == [("b.jsonl", 3.0)]
    assert load_config(p, ["model.preset=", "model.checkpoint=ck"]).model.checkpoint == "ck"  # empty = null
    assert load_config(p, ["train.grad_clip=null"]).train.grad_clip is None


@pytest.mark.parametrize("override, expected", [
    ("train.lr", "--set train.lr: expected key.path=value"),
    ("lora.rnak=4", "--set lora.rnak=4: unknown key lora.rnak — did you mean lora.rank?"),
    ("stpes=4", "--set stpes=4: unknown key stpes — did you mean train.steps?"),
    ("lora=3", "--set lora=3: lora is a section; set one of its keys, e.g. lora.enabled=..."),
    ("train.lr.x=3", "--set train.lr.x=3: train.lr is a value, not a section"),
    ("train.lr=fast", "--set train.lr=fast: train.lr: expected float, got 'fast'"),
    ("lora.targets=[q, qq]", "--set lora.targets=[q, qq]: lora.targets: unknown target 'qq'"),
    ("lora.targets=[q", "--set lora.targets=[q: invalid YAML value"),
])
def test_override_errors(tmp_path, override, expected):
    assert error(tmp_path, BASE, [override]).startswith(expected)


def test_override_fixes_the_file(tmp_path):
    text = BASE.replace("steps: 10", "steps: 0")
    assert error(tmp_path, text).startswith("c.yaml:9: train.steps")
    assert load_config(write(tmp_path, text), ["train.steps=5"]).train.steps == 5


# --- data sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("s, expected", [
    ("a.jsonl", ("a.jsonl", 1.0)),
    ("data/a.jsonl:3", ("data/a.jsonl", 3.0)),
    ("a.jsonl:0.25", ("a.jsonl", 0.25)),
    ("a.jsonl:1e-2", ("a.jsonl", 0.01)),
    ("dir/a:b.jsonl", ("dir/a:b.jsonl", 1.0)),  # not a number after the last ':': part of the path
    ("dir/a:2.jsonl:2", ("dir/a:2.jsonl", 2.0)),
    ("hf://x/y", ("hf://x/y", 1.0)),
])
def test_parse_source(s, expected):
    assert parse_source(s) == expected


@pytest.mark.parametrize("s", ["a.jsonl:0", "a.jsonl:-1", "a.jsonl:", ":2"])
def test_parse_source_errors(s):
    with pytest.raises(UserError):
        parse_source(s)


# --- dicts and code -----------------------------------------------------------------------------------


def test_from_dict(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    d = cfg.to_dict()
    assert d["lora"]["targets"] == list(LORA_TARGETS) and d["train"]["lr"] == 1e-3
    assert config_from_dict(d) == cfg
    d["train"]["lr"] = "x"
    with pytest.raises(UserError, match=r"^run/config\.json: train\.lr: expected float, got 'x'$"):
        config_from_dict(d, source="run/config.json")
    d["train"]["lr"], d["lora"]["rnak"] = 1e-3, 2
    with pytest.raises(UserError, match="unknown key lora.rnak — did you mean lora.rank"):
        RunConfig.from_dict(d)


def test_built_in_code_is_validated(tmp_path):
    with pytest.raises(UserError, match=r"^train\.steps: must be > 0, got 0$"):
        TrainSection(steps=0, batch_size=1, seq_len=2, lr=1.0)
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.replace(train=cfg.train.replace(lr=2)).train.lr == 2.0
    with pytest.raises(UserError, match="lora.rank: must be > 0"):
        cfg.lora.replace(rank=0)
