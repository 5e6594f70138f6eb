"""FP8 QAT train step against the same step without FP8, and what XLA made of the qdq pattern.

    .venv/bin/python benchmarks/fp8_step.py [--preset quarter|nemo-layer] [--batch 2] [--seq 256]
                                            [--dtype bfloat16] [--steps 5] [--lora] [--hlo-out DIR]

Same model, weights and batch; three jitted steps of what train.py runs (full fine-tuning, or LoRA
with --lora): FP8 off, FP8 `delayed`, FP8 `current`. Reported: median step time of each (best of
--steps after one warm-up, the three interleaved so a busy machine slows all alike), the ratio to
FP8 off, and in each compiled program the number of dots / cuBLAS-LT GEMMs whose operands are
float8 (on Hopper, XLA rewrites qdq-around-a-dot into FP8 GEMMs; on CPU there are none and the
ratio is the fake-quantisation overhead). This is the issue's GPU check as one prepared script:

    python benchmarks/fp8_step.py --preset nemo-layer --batch 4 --seq 2048 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemo_jax import fp8 as F8  # noqa: E402
from nemo_jax import lora as lora_lib  # noqa: E402
from nemo_jax import model as M  # noqa: E402
from nemo_jax import train_loop as TL  # noqa: E402
from nemo_jax.config import ModelConfig  # noqa: E402

PRESETS = {
    # NeMo's proportions at a quarter of its width (as benchmarks/train_step.py)
    "quarter": ModelConfig(vocab_size=8192, dim=1280, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128,
                           hidden_dim=3584, max_seq_len=8192),
    # two of NeMo's real layers with a small vocabulary: the GEMM shapes of the 12B model
    "nemo-layer": ModelConfig(vocab_size=8192, dim=5120, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128,
                              hidden_dim=14336, max_seq_len=131072),
}


def count_f8_gemms(hlo: str) -> int:
    """Instructions that multiply float8 operands: `dot(f8e4m3fn[...] ...)` or cuBLAS-LT FP8 calls."""
    n = 0
    for line in hlo.splitlines():
        if ("dot(" in line or "custom-call(" in line) and ("f8e4m3" in line or "f8e5m2" in line):
            if "dot(" in line or "cublas" in line.lower():
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quarter", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--hlo-out", type=Path, help="write each compiled program's HLO text here")
    args = ap.parse_args()

    config = PRESETS[args.preset].replace(dtype=args.dtype, param_dtype="float32" if not args.lora else args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; model {args.preset} ({config.n_layers} layers, dim "
          f"{config.dim}), {args.dtype}, batch {args.batch} x {args.seq}, {'LoRA' if args.lora else 'full FT'}")
    params = M.init_params(config, jax.random.key(0))["params"]
    lora = M.LoraSpec(rank=16, alpha=32.0) if args.lora else None
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(args.batch, args.seq + 1))
    batch = {"tokens": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32),
             "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))}
    import optax

    opt = optax.adam(1e-4)
    variants = {"off": None, "delayed": F8.Fp8Spec(recipe="delayed"), "current": F8.Fp8Spec(recipe="current")}
    steps, states, counts = {}, {}, {}
    for name, spec in variants.items():
        step_spec = TL.StepSpec(config, lora, "none", 1, 512, spec)
        trainable = lora_lib.init_lora(config, lora, jax.random.key(1)) if lora else jax.tree.map(jnp.copy, params)
        frozen = params if lora else None
        fp8_state = M.init_fp8(config, spec, lora)[0] if spec else None
        state = TL.init_state(trainable, opt, 0, fp8_state)
        fn = jax.jit(functools.partial(TL.train_step, step_spec, opt), donate_argnums=(0,))
        compiled = fn.lower(state, frozen, batch).compile()
        hlo = compiled.as_text()
        counts[name] = count_f8_gemms(hlo)
        if args.hlo_out:
            args.hlo_out.mkdir(parents=True, exist_ok=True)
            (args.hlo_out / f"step_{name}.hlo.txt").write_text(hlo)
        state, m = compiled(state, frozen, batch)  # warm-up
        jax.block_until_ready(m)
        steps[name], states[name] = (compiled, frozen), state
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name in variants:
            compiled, frozen = steps[name]
            t = time.perf_counter()
            states[name], m = compiled(states[name], frozen, batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["off"])
    tokens = args.batch * args.seq
    print(f"{'FP8':<10}{'median s':>10}{'best s':>9}{'tokens/s':>10}{'vs off':>8}{'f8 GEMMs':>10}")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<10}{med:10.3f}{min(times[name]):9.3f}{tokens / med:10.0f}{base / med:7.2f}x{counts[name]:10d}")
    if jax.devices()[0].platform == "cpu":
        print("(CPU: no FP8 GEMMs exist; the ratio is the cost of the fake quantisation itself)")


if __name__ == "__main__":
    main()
