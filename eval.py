"""Held-out loss and perplexity of a model on JSONL files, or function-calling accuracy.

    python eval.py --checkpoint PATH --data FILE [FILE ...] [--config C] [--out metrics.json]
                   [--batch-size N] [--seq-len N] [--mesh AXIS=N,...]
    python eval.py --checkpoint PATH --data FILE [FILE ...] --task tool-calls [--max-new-tokens N]
                   [--batch-size N] [--out metrics.json]

PATH: a training run directory (its LoRA applied on its base), an orbax checkpoint, or an HF /
Mistral safetensors directory. Each file is one split named after its stem; every document is
scored on its own (no context across documents), text records as BOS text EOS.

--task tool-calls generates every assistant turn of the instruct files from the conversation before
it and scores tool calls (valid JSON, function names, names + arguments) and text replies (exact
match); see nemo_jax/tool_eval.py.
"""

import argparse

from nemo_jax.errors import cli_main
from nemo_jax.backend import select_platform
from nemo_jax.runtime import tune_malloc


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", nargs="+", required=True, help="JSONL/JSON/parquet files, one split each")
    p.add_argument("--config", help="run config to take tokenizer, seq_len and dtype from")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--tokenizer", default=None, help="tekken.json (default: NeMo's, or the run's)")
    p.add_argument("--no-fp8", action="store_true",
                   help="a QAT run: evaluate the unquantised model (default: simulate its FP8 deployment)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="devices to evaluate on, e.g. fsdp=8 or data=2,tensor=4 (one may be -1: fill); default: "
                        "the run's / --config's mesh where it fits the devices, else one device")
    p.add_argument("--task", choices=["loss", "tool-calls"], default="loss",
                   help="loss: held-out loss/perplexity (default); tool-calls: generate and score each assistant turn")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tool-calls: tokens generated per turn (256)")
    args = p.parse_args(argv)

    from nemo_jax.hub import resolve_model

    args.checkpoint = str(resolve_model(args.checkpoint))  # a Hub id -> its snapshot (nemo_jax/hub.py)
    if args.task == "tool-calls":
        from nemo_jax.tool_eval import main_tool_eval

        main_tool_eval(args)
    else:
        from nemo_jax.evaluate import main_eval

        main_eval(args)


if __name__ == "__main__":
    # First, before JAX exists: XLA's CPU buffers then reuse one malloc heap instead of page-faulting
    # fresh mmaps every step (allocator parameters only; see nemo_jax/runtime.py).
    select_platform()
    tune_malloc()
    main()
