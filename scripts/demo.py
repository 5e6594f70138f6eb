"""`make demo`: the whole product on a laptop CPU, with the same commands a user runs.

It starts, as a user starts from NeMo 12B, from a shipped base: data/demo/base/, the `demo` preset (NeMo's
shape at toy size) pretrained from scratch by `make demo-base` (configs/demo_base.yaml, 36 minutes on 2 cores).

1. evaluate the base on the held-out function-calling split (before);
2. fully fine-tune it on the shipped multilingual function-calling set (SFT);
3. evaluate again (after) and export the model for transformers;
4. DPO on the shipped preference pairs (right tool call over a wrong tool or wrong arguments), LoRA on the
   exported SFT model (also the DPO reference); export the adapter for PEFT; evaluate reward accuracy and tool
   calls once more.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("outputs/demo")
EVAL = ["data/demo/tools_eval.jsonl", "data/demo/pretrain_eval.jsonl"]
PREFS = "data/demo/prefs_eval.jsonl"
BASE = "data/demo/base"  # shipped; rebuilt by `make demo-base`


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
    run("eval.py", "--checkpoint", BASE, "--data", *EVAL, "--seq-len", "384", "--out", str(OUT / "eval_before.json"))
    tools_task = ("--data", EVAL[0], "--task", "tool-calls", "--max-new-tokens", "128")
    run("eval.py", "--checkpoint", BASE, *tools_task, "--out", str(OUT / "tools_before.json"))
    run("train.py", "--config", "configs/demo_sft.yaml")
    run("eval.py", "--checkpoint", str(OUT / "sft"), "--data", *EVAL, "--seq-len", "384", "--out", str(OUT / "eval_after.json"))
    run("eval.py", "--checkpoint", str(OUT / "sft"), *tools_task, "--out", str(OUT / "tools_after.json"))
    run("-m", "nemo_jax.convert", "export", str(OUT / "sft"), str(OUT / "export_hf"), "--format", "hf", "--force")
    run("train.py", "--config", "configs/demo_dpo.yaml")
    run("-m", "nemo_jax.convert", "export", str(OUT / "dpo"), str(OUT / "export_peft"), "--format", "peft", "--force")
    run("eval.py", "--checkpoint", str(OUT / "dpo"), "--data", PREFS, "--out", str(OUT / "prefs_after.json"))
    run("eval.py", "--checkpoint", str(OUT / "dpo"), *tools_task, "--out", str(OUT / "tools_dpo.json"))

    before = json.loads((ROOT / OUT / "eval_before.json").read_text())
    after = json.loads((ROOT / OUT / "eval_after.json").read_text())
    print("\nheld-out loss (nats/token), base -> after fine-tuning:")
    for split in before:
        b, a = before[split]["loss"], after[split]["loss"]
        print(f"  {split:<16} {b:7.4f} -> {a:7.4f}   perplexity {before[split]['perplexity']:9.2f} -> "
              f"{after[split]['perplexity']:9.2f}")
    tb = json.loads((ROOT / OUT / "tools_before.json").read_text())["overall"]
    ta = json.loads((ROOT / OUT / "tools_after.json").read_text())["overall"]
    td = json.loads((ROOT / OUT / "tools_dpo.json").read_text())["overall"]
    print("\nfunction calling on the held-out split: base -> SFT -> SFT + DPO:")
    for k in ("tool_call_valid_json", "tool_call_name_accuracy", "tool_call_exact", "text_exact"):
        print(f"  {k:<24} {tb[k]:6.1%} -> {ta[k]:6.1%} -> {td[k]:6.1%}")
    recs = [json.loads(line) for line in (ROOT / OUT / "dpo" / "metrics.jsonl").read_text().splitlines()]
    pb = next(r for r in recs if r.get("split") == "prefs_eval")  # step 0: the model is its own reference
    pa = json.loads((ROOT / OUT / "prefs_after.json").read_text())["prefs_eval"]
    print(f"\nheld-out preference pairs ({pa['pairs']}), before -> after DPO:")
    for k in ("reward_accuracy", "reward_margin", "dpo_loss"):
        fmt = ".1%" if k == "reward_accuracy" else ".4f"
        print(f"  {k:<24} {pb[k]:{fmt}} -> {pa[k]:{fmt}}")
    print(f"""
where things are (under {ROOT / OUT}):
  sft/                fine-tuning run directory: checkpoints/, metrics.jsonl, tb/ (tensorboard --logdir), loss.png
  eval_before.json, eval_after.json, tools_before.json, tools_after.json
  export_hf/          the fine-tuned model for transformers.AutoModelForCausalLM.from_pretrained
  dpo/                DPO run directory (LoRA on export_hf, its reference), metrics.jsonl with the rewards
  export_peft/        the DPO adapter (adapter_config.json + adapter_model.safetensors) for HF PEFT on export_hf
  prefs_after.json, tools_dpo.json
demo finished in {time.time() - t0:.0f} s""")


if __name__ == "__main__":
    main()
