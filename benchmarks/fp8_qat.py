"""FP8 quantisation-aware training on the demo model: how much of the post-training-quantisation
(PTQ) loss gap does QAT recover?

    .venv/bin/python benchmarks/fp8_qat.py [--base outputs/demo/pretrain] [--steps 60] [--lr 3e-4]
                                           [--recipe delayed] [--forward-only]
                                           [--qad-steps 200] [--qad-lr 3e-5] [--out outputs/bench_fp8]

With the same commands a user runs (train.py, convert export --format hf-fp8, eval.py):

  base      the demo model pretrained from scratch (configs/demo_pretrain.yaml; trained unless
            --base names an existing run), evaluated unquantised in bf16 compute
  PTQ       its hf-fp8 export, input scales calibrated on the training corpus, evaluated as the
            served model runs it (e4m3 weights x scale, static e4m3 inputs; eval.py simulates it,
            exactly as transformers + compressed-tensors does, see tests/test_fp8.py)
  control   the base fine-tuned --steps more steps in plain precision, then PTQ as above: the same
            extra training without QAT, so that QAT is not credited with what more steps did
  QAT       the base fine-tuned --steps steps with fp8.enabled, its hf-fp8 export (trained scales)
  QAD       quantisation-aware distillation (fp8.distill): the base trained --qad-steps steps at
            --qad-lr, forward-only FP8, towards the unquantised base's own next-token
            distributions (KL), then its hf-fp8 export. Its objective cannot improve on the base,
            so no control is needed: it is compared with the base's own PTQ gap

and reports held-out loss on data/demo/pretrain_eval.jsonl. Gap = FP8 export loss - the reference
model's bf16 loss; recovered = 1 - QAT gap / control PTQ gap, and 1 - QAD gap / base PTQ gap
(goal: most of it). --qad-steps 0 skips QAD.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL = "data/demo/pretrain_eval.jsonl"
TRAIN = "data/demo/pretrain_train.jsonl"


def run(*args):
    t = time.time()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): python {' '.join(args)}\n{p.stderr[-3000:]}")
    print(f"  ({time.time() - t:5.0f} s) python {' '.join(args)}", flush=True)
    return p.stdout


def evaluate(ckpt: Path, out: Path, dtype: str | None = None) -> float:
    extra = ["--dtype", dtype, "--no-fp8"] if dtype else []
    run("eval.py", "--checkpoint", str(ckpt), "--data", EVAL, "--seq-len", "256", "--out", str(out), *extra)
    return json.loads(out.read_text())["pretrain_eval"]["loss"]


def export_fp8(run_dir: Path, out: Path, calibrate: bool):
    cal = ["--calibration-data", TRAIN, "--calibration-batches", "16", "--calibration-seq-len", "256"] if calibrate else []
    run("-m", "nemo_jax.convert", "export", str(run_dir), str(out), "--format", "hf-fp8", "--force", *cal)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="an existing demo pretrain run (default: train one)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--recipe", default="delayed", choices=("delayed", "current"))
    ap.add_argument("--forward-only", action="store_true", help="QAT with fp8.quantize_grads=false")
    ap.add_argument("--qad-steps", type=int, default=200, help="quantisation-aware distillation steps (0: skip)")
    ap.add_argument("--qad-lr", type=float, default=3e-5)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_fp8"))
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = args.base or args.out / "base"
    if args.base is None:
        run("train.py", "--config", "configs/demo_pretrain.yaml", "--set", f"output_dir={base}")
    ft = ["--config", "configs/demo_pretrain.yaml", "--set", "model.preset=null", "--set", f"model.checkpoint={base}",
          "--set", f"train.steps={args.steps}", "--set", f"train.lr={args.lr}", "--set", "train.warmup_steps=5",
          "--set", "train.eval_every=0", "--set", "checkpoint.every=0", "--set", "data.eval=[]"]
    run("train.py", *ft, "--set", f"output_dir={args.out / 'control'}")
    run("train.py", *ft, "--set", f"output_dir={args.out / 'qat'}", "--set", "fp8.enabled=true",
        "--set", f"fp8.recipe={args.recipe}", "--set", "fp8.amax_history=16",
        "--set", f"fp8.quantize_grads={str(not args.forward_only).lower()}")
    if args.qad_steps:
        qad = list(ft)
        qad[qad.index(f"train.steps={args.steps}")] = f"train.steps={args.qad_steps}"
        qad[qad.index(f"train.lr={args.lr}")] = f"train.lr={args.qad_lr}"
        run("train.py", *qad, "--set", f"output_dir={args.out / 'qad'}", "--set", "fp8.enabled=true",
            "--set", f"fp8.recipe={args.recipe}", "--set", "fp8.amax_history=16", "--set", "fp8.quantize_grads=false",
            "--set", "fp8.distill=true")
        export_fp8(out / "qad", out / "qad_fp8", calibrate=False)
    export_fp8(base, out / "base_fp8", calibrate=True)
    export_fp8(out / "control", out / "control_fp8", calibrate=True)
    export_fp8(out / "qat", out / "qat_fp8", calibrate=False)

    rows = {
        "base, bf16": evaluate(base, out / "e_base.json", "bfloat16"),
        "base, FP8 PTQ": evaluate(out / "base_fp8", out / "e_base_fp8.json"),
        f"control (+{args.steps} steps), bf16": evaluate(out / "control", out / "e_control.json", "bfloat16"),
        f"control (+{args.steps} steps), FP8 PTQ": evaluate(out / "control_fp8", out / "e_control_fp8.json"),
        f"QAT (+{args.steps} steps), bf16": evaluate(out / "qat", out / "e_qat_bf16.json", "bfloat16"),
        f"QAT (+{args.steps} steps), FP8 export": evaluate(out / "qat_fp8", out / "e_qat_fp8.json"),
    }
    if args.qad_steps:
        rows[f"QAD ({args.qad_steps} steps), FP8 export"] = evaluate(out / "qad_fp8", out / "e_qad_fp8.json")
    names = list(rows)
    ptq_gap = rows[names[3]] - rows[names[2]]
    qat_gap = rows[names[5]] - rows[names[2]]
    print(f"\nheld-out loss on {EVAL} (nats/token; {time.time() - t0:.0f} s in all)")
    print(f"{'model':<34}{'loss':>9}")
    for k, v in rows.items():
        print(f"{k:<34}{v:9.4f}")
    print(f"\nPTQ gap after the same training (control FP8 - control bf16): {ptq_gap:+.4f}")
    print(f"QAT gap (QAT FP8 export - control bf16):                      {qat_gap:+.4f}")
    own = rows[names[5]] - rows[names[4]]
    print(f"QAT model's own gap (its FP8 export - its bf16):              {own:+.4f}")
    if ptq_gap > 0:
        print(f"recovered: {100 * (1 - qat_gap / ptq_gap):.0f}% of the PTQ gap "
              f"(own gap: {100 * (1 - own / ptq_gap):.0f}% smaller than the control's)")
    qad_recovered = None
    if args.qad_steps:
        base_gap = rows[names[1]] - rows[names[0]]
        qad_gap = rows[names[6]] - rows[names[0]]
        print(f"base PTQ gap (base FP8 - base bf16):                          {base_gap:+.4f}")
        print(f"QAD gap (QAD FP8 export - base bf16):                         {qad_gap:+.4f}")
        if base_gap > 0:
            qad_recovered = 1 - qad_gap / base_gap
            print(f"QAD recovered: {100 * qad_recovered:.0f}% of the base's PTQ gap "
                  f"(goal: most of it: {'met' if qad_recovered > 0.5 else 'NOT met'})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "ptq_gap": ptq_gap, "qat_gap": qat_gap,
                                                  "qad_recovered": qad_recovered, "qad_steps": args.qad_steps,
                                                  "qad_lr": args.qad_lr,
                                                  "qat_own_gap": own, "steps": args.steps, "lr": args.lr, "recipe": args.recipe,
                                                  "forward_only": args.forward_only},
                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
