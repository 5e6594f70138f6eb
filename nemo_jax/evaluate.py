"""eval.py's library side: held-out loss / perplexity per split for any checkpoint kind
(`--task tool-calls` goes to tool_eval.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np

from nemo_jax import sharding as S
from nemo_jax import train_loop as TL
from nemo_jax.errors import UserError
from nemo_jax.run_config import eval_split_name

DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH = 8


def _run_config(args):
    from nemo_jax.run_config import load_config

    if args.config:
        return load_config(args.config)
    run_cfg = Path(args.checkpoint) / "config.yaml"
    if (Path(args.checkpoint) / "run.json").exists() and run_cfg.exists():
        return load_config(run_cfg)
    return None


def load_for_eval(path: str, dtype: str | None):
    """(config, params, lora_params, lora spec) from a run directory or any model checkpoint."""
    from nemo_jax.trainer import load_run

    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint {path}: no such file or directory")
    if (p / "run.json").exists():
        config, params, lora_params, spec = load_run(p)
    else:
        from nemo_jax.checkpoint import load

        (config, params), lora_params, spec = load(path), None, None
    if dtype:
        config = config.replace(dtype=dtype)
    return config, params, lora_params, spec


def load_fp8_for_eval(path: str, params):
    """(params, (Fp8Spec, state)) when `path` is a QAT run: evaluation then simulates the served
    FP8 model (quantised inputs and weights, the trained scales; an FP8-stored base quantised as in
    training); else (params, None)."""
    from nemo_jax import fp8 as F8
    from nemo_jax.trainer import fp8_eval_spec, load_run_fp8

    if not (Path(path) / "run.json").exists():
        return params, None
    spec, state = load_run_fp8(path)
    if spec is None:
        return params, None
    if spec.base_fp8:
        params, state = F8.quantize_base(params, state, spec)
    return params, (fp8_eval_spec(spec), state)


def evaluate_files(config, params, lora_params, spec, files, tokenizer, seq_len, batch_size,
                   loss_chunk=1024, fp8=None) -> dict:
    """fp8: (Fp8Spec, state) for an FP8-simulated forward."""
    from nemo_jax.data import make_eval_batches
    from nemo_jax.trainer import evaluate

    mesh = S.make_mesh(devices=jax.devices()[:1])
    fp8_spec, fp8_state = fp8 or (None, None)
    step_spec = TL.StepSpec(config, spec, "none", 1, loss_chunk, fp8_spec)
    eval_sums = jax.jit(functools.partial(TL.eval_sums, step_spec))
    eval_fn = lambda p, lp, b: eval_sums(p, lp, b, fp8_state)
    results = {}
    for path in files:
        if not Path(path).exists():
            raise UserError(f"--data {path}: no such file")
        batches = make_eval_batches(path, tokenizer, seq_len, batch_size)
        loss, count = evaluate(eval_fn, params, lora_params, batches, S.batch_sharding(mesh))
        results[eval_split_name(path)] = {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(count)}
    return results


def format_table(results: dict) -> str:
    w = max([5] + [len(k) for k in results])
    lines = [f"{'split':<{w}}  {'loss':>8}  {'perplexity':>12}  {'tokens':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<{w}}  {r['loss']:>8.4f}  {r['perplexity']:>12.3f}  {r['tokens']:>10,}")
    return "\n".join(lines)


def write_results(results: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


def main_eval(args) -> dict:
    from nemo_jax.trainer import tokenizer_for

    if getattr(args, "task", "loss") == "tool-calls":
        from nemo_jax.tool_eval import main_tool_eval

        return main_tool_eval(args)
    if getattr(args, "max_new_tokens", None) is not None:
        raise UserError("--max-new-tokens applies to --task tool-calls only")
    cfg = _run_config(args)
    seq_len = args.seq_len or (cfg.train.seq_len if cfg else DEFAULT_SEQ_LEN)
    batch_size = args.batch_size or (cfg and (cfg.train.micro_batch_size or cfg.train.batch_size)) or DEFAULT_BATCH
    dtype = args.dtype or (cfg.model.dtype if cfg else None)
    tok_path = args.tokenizer or (cfg.data.tokenizer if cfg else None)
    if seq_len < 2 or batch_size < 1:
        raise UserError("--seq-len must be ≥ 2 and --batch-size ≥ 1")
    from nemo_jax.checkpoint.fp8_io import is_fp8_checkpoint, load_fp8_export

    if Path(args.checkpoint).is_dir() and is_fp8_checkpoint(args.checkpoint):
        config, params, fp8_spec, fp8_state = load_fp8_export(args.checkpoint)
        config = config.replace(dtype=dtype) if dtype else config
        lora_params, spec, fp8 = None, None, (fp8_spec, fp8_state)
    else:
        config, params, lora_params, spec = load_for_eval(args.checkpoint, dtype)
        params, fp8 = load_fp8_for_eval(args.checkpoint, params) if not getattr(args, "no_fp8", False) \
            else (params, None)
    if fp8 is not None:
        print(f"{args.checkpoint}: FP8 model: evaluating the simulated FP8 forward "
              f"({', '.join(fp8[0].targets)} in e4m3, static input scales)")
    tokenizer = tokenizer_for(config, tok_path)
    loss_chunk = cfg.train.loss_chunk if cfg else 1024
    results = evaluate_files(config, params, lora_params, spec, args.data, tokenizer, seq_len, batch_size,
                             loss_chunk, fp8)
    print(format_table(results))
    write_results(results, args.out)
    return results
