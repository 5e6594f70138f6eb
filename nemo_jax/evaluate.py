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


def evaluate_files(config, params, lora_params, spec, files, tokenizer, seq_len, batch_size,
                   loss_chunk=1024) -> dict:
    from nemo_jax.data import make_eval_batches
    from nemo_jax.trainer import evaluate

    mesh = S.make_mesh(devices=jax.devices()[:1])
    step_spec = TL.StepSpec(config, spec, "none", 1, loss_chunk)
    eval_fn = jax.jit(functools.partial(TL.eval_sums, step_spec))
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
    config, params, lora_params, spec = load_for_eval(args.checkpoint, dtype)
    tokenizer = tokenizer_for(config, tok_path)
    loss_chunk = cfg.train.loss_chunk if cfg else 1024
    results = evaluate_files(config, params, lora_params, spec, args.data, tokenizer, seq_len, batch_size,
                             loss_chunk)
    print(format_table(results))
    write_results(results, args.out)
    return results
