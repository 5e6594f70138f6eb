"""Convert checkpoints between HF / Mistral safetensors and nemo_jax's orbax layout.

    python -m nemo_jax.convert import SRC OUT [--format hf|mistral] [--dtype bfloat16|float32] [--force]
    python -m nemo_jax.convert export CKPT OUT --format hf|mistral|peft|hf-fp8|gguf [--dtype ...] [--max-shard-size 5GB]
                                   [--calibration-data FILE ...] [--gguf-type bf16|f16|q8_0] [--force]

`import` detects SRC's layout unless --format names it and writes a nemo_jax checkpoint. `export`
reads any checkpoint (normally a nemo_jax one) and writes the layout --format names. Both stream one
stacked tensor at a time, refuse a non-empty OUT without --force, and write into a temporary
directory renamed at the end. In the same dtype, import then export gives back identical tensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nemo_jax.errors import cli_main

DTYPE_CHOICES = ("bfloat16", "float32")


def _parser() -> argparse.ArgumentParser:
    from nemo_jax.checkpoint import EXPORTERS

    p = argparse.ArgumentParser(prog="python -m nemo_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF or Mistral safetensors -> nemo_jax checkpoint")
    imp.add_argument("src", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--format", choices=("hf", "mistral"), help="SRC's layout (default: detected)")
    exp = sub.add_parser("export", help="checkpoint -> HF or Mistral safetensors")
    exp.add_argument("ckpt", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--format", required=True, choices=tuple(EXPORTERS), help="layout to write")
    exp.add_argument("--max-shard-size", default="5GB", help="largest HF shard (default 5GB)")
    cal = exp.add_argument_group("hf-fp8 of a model trained without FP8 (post-training quantisation)")
    cal.add_argument("--calibration-data", nargs="+", default=(), metavar="FILE",
                     help="jsonl files whose activations set the static input scales")
    cal.add_argument("--calibration-batches", type=int, default=8, help="batches to calibrate on (default 8)")
    cal.add_argument("--calibration-seq-len", type=int, default=512, help="tokens per row (default 512)")
    cal.add_argument("--tokenizer", help="tekken.json for the calibration data or the GGUF vocabulary (default: "
                                         "the shipped one; for gguf the checkpoint's own tekken.json if it has one)")
    exp.add_argument("--gguf-type", choices=("bf16", "f16", "q8_0"), default="bf16",
                     help="--format gguf: weight type in OUT/model.gguf, for llama.cpp and Ollama (default bf16)")
    for s in (imp, exp):
        s.add_argument("--dtype", choices=DTYPE_CHOICES, help="convert the weights (default: keep their dtype)")
        s.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from nemo_jax import calibration, checkpoint as ckpt
    from nemo_jax.checkpoint.export import parse_size

    progress = False if args.no_progress else None  # None: the bar shows only on a terminal
    start = time.perf_counter()
    if args.command == "import":
        source = ckpt.open_checkpoint(args.src, args.format)  # a nemo_jax SRC works too (e.g. to change dtype)
        config = ckpt.import_checkpoint(source, args.out, args.dtype, args.force, progress=progress)
        what = f"nemo_jax checkpoint ({config.param_dtype})"
    else:
        source = ckpt.open_checkpoint(args.ckpt)  # any layout; a nemo_jax path goes through resolve_checkpoint
        opts = ckpt.ExportOptions(dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size),
                                  progress=progress, calibration=tuple(args.calibration_data),
                                  calibration_batches=args.calibration_batches,
                                  calibration_seq_len=args.calibration_seq_len, tokenizer=args.tokenizer,
                                  calibrate=calibration.calibrate,
                                  gguf_type=args.gguf_type)
        ckpt.export_checkpoint(source, args.out, args.format, opts, args.force)
        kind = args.gguf_type if args.format == "gguf" else source.config_for(args.dtype).param_dtype
        what = f"{args.format} checkpoint ({kind})"
    print(f"wrote {args.out}: {what} from {source.description} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    from nemo_jax.backend import select_platform

    select_platform()  # before JAX exists
    main(sys.argv[1:])
