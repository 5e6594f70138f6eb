"""eval.py's library side: held-out loss / perplexity per split for any checkpoint kind, and the
loading both eval tasks and chat share (`--task tool-calls` is tool_eval.py, which imports this)."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from nemo_jax import preference, sharding, train_loop
from nemo_jax.checkpoint.runs import default_mesh, load_run, load_run_fp8
from nemo_jax.errors import UserError
from nemo_jax.run_config import eval_split_name

DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH = 8


def run_config_of(checkpoint: str, config: str | None = None):
    """The RunConfig that sets the defaults of an evaluation or a chat: `--config`'s, else the run's own
    config.yaml when `checkpoint` is a training run directory, else None."""
    from nemo_jax.run_config import load_config

    if config:
        return load_config(config)
    run_cfg = Path(checkpoint) / "config.yaml"
    if (Path(checkpoint) / "run.json").exists() and run_cfg.exists():
        return load_config(run_cfg)
    return None


def eval_mesh(flag: str | None, cfg):
    """The mesh to evaluate on: `--mesh` (e.g. "fsdp=8", "data=2,tensor=4"), else the run's / --config's
    mesh if it fits the devices there are, else the first device alone."""
    if flag:
        return sharding.make_mesh(**sharding.parse_mesh(flag, "--mesh"))
    if cfg is not None:
        m = cfg.mesh
        try:
            sharding.mesh_shape(m.data, m.fsdp, m.tensor, m.sequence, jax.device_count())
        except UserError:  # trained on another device count: it is read onto this one
            return default_mesh()
        return sharding.make_mesh(m.data, m.fsdp, m.tensor, m.sequence)
    return default_mesh()


def check_eval_shape(mesh, batch_size: int, seq_len: int) -> None:
    """Batches are split over the mesh as in training: rows over the data-parallel devices, positions
    over the sequence-parallel ones."""
    rows, positions = sharding.batch_split(mesh)
    if batch_size % rows:
        raise UserError(f"--batch-size {batch_size}: must be divisible by the mesh's {rows} data-parallel "
                        f"ways ({sharding.describe(mesh)})")
    if seq_len % positions:
        raise UserError(f"--seq-len {seq_len}: must be divisible by the mesh's {positions} sequence-parallel "
                        f"ways ({sharding.describe(mesh)})")


def load_for_eval(path: str, dtype: str | None, mesh=None):
    """(config, params, lora_params, lora spec) from a run directory or any model checkpoint, laid out
    on `mesh` (default: the first device) by the training rules. `dtype` is the compute dtype."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint {path}: no such file or directory")
    mesh = mesh if mesh is not None else default_mesh()
    if (p / "run.json").exists():
        config, params, lora_params, spec = load_run(p, mesh=mesh)
    else:
        from nemo_jax.checkpoint import load_abstract, restore

        shardings = param_shardings(load_abstract(path)[0], mesh)
        (config, params), lora_params, spec = restore(path, shardings), None, None
    if dtype:
        config = config.replace(dtype=dtype)
    return config, params, lora_params, spec


def reference_for_eval(path: str, dtype: str | None, mesh):
    """The params a full fine-tuning run started from (its run.json base checkpoint), or None."""
    run_json = Path(path) / "run.json"
    if not run_json.exists():
        return None
    base = (json.loads(run_json.read_text()).get("base") or {}).get("checkpoint")
    if not base:  # trained from scratch: no starting model to compare with
        return None
    from nemo_jax.hub import resolve_model

    return load_for_eval(str(resolve_model(base)), dtype, mesh)[1]


def param_shardings(config, mesh):
    """The training rules' shardings of the model's param tree on `mesh`."""
    from nemo_jax import model

    return sharding.tree_shardings(model.logical_axes(config)["params"], model.abstract_variables(config)["params"], mesh)


def load_fp8_for_eval(path: str, params, mesh=None):
    """(params, (Fp8Spec, state)) when `path` is a QAT run: evaluation then simulates the served
    FP8 model (quantised inputs and weights, the trained scales; an FP8-stored base quantised as in
    training); else (params, None)."""
    from nemo_jax.fp8 import quantize_base
    from nemo_jax.trainer import fp8_eval_spec

    if not (Path(path) / "run.json").exists():
        return params, None
    spec, state = load_run_fp8(path, mesh=mesh)
    if spec is None:
        return params, None
    if spec.base_fp8:
        params, state = quantize_base(params, state, spec)
    return params, (fp8_eval_spec(spec), state)


def evaluate_files(config, params, lora_params, spec, files, tokenizer, seq_len, batch_size,
                   loss_chunk=1024, fp8=None, mesh=None, dpo=None, reference=None) -> dict:
    """fp8: (Fp8Spec, state) for an FP8-simulated forward. `mesh`: the one the params lie on (default:
    the first device); batches are split over it as in training.

    Preference files (preference.py) get the DPO loss and reward metrics instead, against the
    reference model: a LoRA run's base, else `reference` (the params a full fine-tuning started
    from); `dpo`: the train_loop.DpoSpec (beta) to score with."""
    from nemo_jax.data import make_eval_batches
    from nemo_jax.trainer import evaluate

    mesh = mesh if mesh is not None else default_mesh()
    check_eval_shape(mesh, batch_size, seq_len)
    fp8_spec, fp8_state = fp8 or (None, None)
    step_spec = train_loop.StepSpec(config, spec, "none", 1, loss_chunk, fp8_spec)
    traced = functools.partial(train_loop.eval_sums, step_spec)

    def sums(*args):  # activations laid out by the training rules, as in the training step
        with sharding.activation_mesh(mesh):
            return traced(*args)

    eval_sums = jax.jit(sums)
    eval_fn = lambda p, lp, b: eval_sums(p, lp, b, fp8_state)
    results = {}
    dpo_fn = None
    for path in files:
        if not Path(path).exists() and not str(path).startswith("hf:"):  # hf: a Hub dataset (records.py)
            raise UserError(f"--data {path}: no such file")
        if preference.is_preference_source(path):
            from nemo_jax.trainer import evaluate_pairs

            if spec is None and reference is None:
                raise UserError(f"--data {path}: preference pairs are scored against the model a run started from; "
                                "give a LoRA run or a full fine-tuning run whose base checkpoint is available")
            if dpo_fn is None:
                dpo_spec = dataclasses.replace(step_spec, fp8=None, dpo=dpo or train_loop.DpoSpec())
                traced_dpo = functools.partial(train_loop.dpo_eval_sums, dpo_spec)

                def dpo_sums(*args):
                    with sharding.activation_mesh(mesh):
                        return traced_dpo(*args)

                dpo_fn = jax.jit(dpo_sums)
            batches = preference.make_pair_eval_batches(path, tokenizer, seq_len, batch_size)
            results[eval_split_name(path)] = evaluate_pairs(dpo_fn, params, lora_params,
                                                            params if reference is None else reference, batches,
                                                            sharding.batch_sharding(mesh))
            continue
        batches = make_eval_batches(path, tokenizer, seq_len, batch_size)
        loss, count = evaluate(eval_fn, params, lora_params, batches, sharding.batch_sharding(mesh))
        results[eval_split_name(path)] = {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(count)}
    return results


def format_table(results: dict) -> str:
    from nemo_jax.trainer import format_rewards

    w = max([5] + [len(k) for k in results])
    lines = [f"{'split':<{w}}  {'loss':>8}  {'perplexity':>12}  {'tokens':>10}"]
    for name, r in results.items():
        if "reward_accuracy" in r:
            lines.append(f"{name:<{w}}  {format_rewards(r)}")
            continue
        lines.append(f"{name:<{w}}  {r['loss']:>8.4f}  {r['perplexity']:>12.3f}  {r['tokens']:>10,}")
    return "\n".join(lines)


def write_results(results: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


def main_eval(args) -> dict:
    """eval.py --task loss (tool_eval.main_tool_eval is --task tool-calls)."""
    from nemo_jax.tokenizer import tokenizer_for

    if getattr(args, "task", "loss") != "loss":
        raise UserError(f"--task {args.task}: main_eval scores held-out loss; --task tool-calls is "
                        "nemo_jax.tool_eval.main_tool_eval")
    if getattr(args, "max_new_tokens", None) is not None:
        raise UserError("--max-new-tokens applies to --task tool-calls only")
    cfg = run_config_of(args.checkpoint, args.config)
    seq_len = args.seq_len or (cfg.train.seq_len if cfg else DEFAULT_SEQ_LEN)
    batch_size = args.batch_size or (cfg and (cfg.train.micro_batch_size or cfg.train.batch_size)) or DEFAULT_BATCH
    dtype = args.dtype or (cfg.model.dtype if cfg else None)
    tok_path = args.tokenizer or (cfg.data.tokenizer if cfg else None)
    if seq_len < 2 or batch_size < 1:
        raise UserError("--seq-len must be ≥ 2 and --batch-size ≥ 1")
    from nemo_jax.checkpoint.fp8_io import is_fp8_checkpoint, load_fp8_export

    mesh = eval_mesh(getattr(args, "mesh", None), cfg)
    check_eval_shape(mesh, batch_size, seq_len)
    if Path(args.checkpoint).is_dir() and is_fp8_checkpoint(args.checkpoint):
        config, params, fp8_spec, fp8_state = load_fp8_export(args.checkpoint)
        config = config.replace(dtype=dtype) if dtype else config
        params = jax.device_put(params, param_shardings(config, mesh))
        fp8_state = jax.device_put(fp8_state, sharding.replicated(mesh))
        lora_params, spec, fp8 = None, None, (fp8_spec, fp8_state)
    else:
        config, params, lora_params, spec = load_for_eval(args.checkpoint, dtype, mesh)
        params, fp8 = load_fp8_for_eval(args.checkpoint, params, mesh) if not getattr(args, "no_fp8", False) \
            else (params, None)
    if fp8 is not None:
        print(f"{args.checkpoint}: FP8 model: evaluating the simulated FP8 forward "
              f"({', '.join(fp8[0].targets)} in e4m3, static input scales)")
    tokenizer = tokenizer_for(config, tok_path)
    loss_chunk = cfg.train.loss_chunk if cfg else 1024
    dpo = train_loop.DpoSpec(cfg.dpo.beta, cfg.dpo.label_smoothing) if cfg is not None else None
    reference = None
    if spec is None and any(preference.is_preference_source(p) for p in args.data):
        reference = reference_for_eval(args.checkpoint, dtype, mesh)
    results = evaluate_files(config, params, lora_params, spec, args.data, tokenizer, seq_len, batch_size,
                             loss_chunk, fp8, mesh, dpo, reference)
    print(format_table(results))
    write_results(results, args.out)
    return results
