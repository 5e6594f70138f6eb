"""`make demo`: the whole product on a laptop CPU, with the same commands a user runs.

1. pretrain a small NeMo-architecture model from scratch on the shipped multilingual corpus;
2. evaluate it on the held-out function-calling split (before);
3. LoRA-fine-tune it on the shipped multilingual function-calling set;
4. evaluate again (after), export the adapter for PEFT and the merged model for transformers.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("outputs/demo")
EVAL = ["data/demo/tools_eval.jsonl", "data/demo/pretrain_eval.jsonl"]


def run(*args):
    cmd = [sys.executable, *args]
    print(f"\n$ python {' '.join(args)}", flush=True)
    t = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
        sys.exit(f"demo: command failed with exit code {rc}: python {' '.join(args)}")
    print(f"({time.time() - t:.0f} s)", flush=True)


def main():
    t0 = time.time()
    run("train.py", "--config", "configs/demo_pretrain.yaml")
    run("eval.py", "--checkpoint", str(OUT / "pretrain"), "--data", *EVAL, "--seq-len", "384", "--out", str(OUT / "eval_before.json"))
    tools_task = ("--data", EVAL[0], "--task", "tool-calls", "--max-new-tokens", "128")
    run("eval.py", "--checkpoint", str(OUT / "pretrain"), *tools_task, "--out", str(OUT / "tools_before.json"))
    run("train.py", "--config", "configs/demo_lora.yaml")
    run("eval.py", "--checkpoint", str(OUT / "lora"), "--data", *EVAL, "--seq-len", "384", "--out", str(OUT / "eval_after.json"))
    run("eval.py", "--checkpoint", str(OUT / "lora"), *tools_task, "--out", str(OUT / "tools_after.json"))
    run("-m", "nemo_jax.convert", "export", str(OUT / "lora"), str(OUT / "export_peft"), "--format", "peft", "--force")
    run("-m", "nemo_jax.convert", "export", str(OUT / "lora"), str(OUT / "export_hf"), "--format", "hf", "--force")

    before = json.loads((ROOT / OUT / "eval_before.json").read_text())
    after = json.loads((ROOT / OUT / "eval_after.json").read_text())
    print("\nheld-out loss (nats/token), before -> after LoRA fine-tuning:")
    for split in before:
        b, a = before[split]["loss"], after[split]["loss"]
        print(f"  {split:<16} {b:7.4f} -> {a:7.4f}   perplexity {before[split]['perplexity']:9.2f} -> "
              f"{after[split]['perplexity']:9.2f}")
    tb = json.loads((ROOT / OUT / "tools_before.json").read_text())["overall"]
    ta = json.loads((ROOT / OUT / "tools_after.json").read_text())["overall"]
    print("\nfunction calling on the held-out split, before -> after:")
    for k in ("tool_call_valid_json", "tool_call_name_accuracy", "tool_call_exact", "text_exact"):
        print(f"  {k:<24} {tb[k]:6.1%} -> {ta[k]:6.1%}")
    print(f"""
where things are (under {ROOT / OUT}):
  pretrain/           run directory: checkpoints/, metrics.jsonl, tb/ (tensorboard --logdir), loss.png
  lora/               LoRA run directory (adapters + optimizer state; base = pretrain/), loss.png
  eval_before.json, eval_after.json, tools_before.json, tools_after.json
  export_peft/        adapter_config.json + adapter_model.safetensors for HF PEFT
  export_hf/          merged model for transformers.AutoModelForCausalLM.from_pretrained
demo finished in {time.time() - t0:.0f} s""")


if __name__ == "__main__":
    main()
