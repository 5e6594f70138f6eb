"""Decode speed of `nemo_jax.generate` against HF transformers' `generate` (KV cache), same weights.

    .venv/bin/python benchmarks/generate.py [--model demo|small] [--batch 8] [--prompt 64] [--new 128]

A random MistralForCausalLM of the chosen shape is saved with save_pretrained (fp32) and loaded by
both sides; both decode greedily from the same random prompts, never stopping early (no EOS), in the
same process on the same CPU threads. Decode tokens/s counts the new tokens after the first, from
two timed runs: B * (N - 1) / (t(N new tokens) - t(1 new token)), so prefill and start-up cancel
out; the end-to-end figure includes them. Each time is the best of --repeat rounds after a warm-up
(JAX compiles once per shape); a round times both sides in turn, so that a busy machine slows both
alike. The outputs of both sides are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemo_jax.config import ModelConfig, preset, to_hf_config  # noqa: E402

MODELS = {
    "demo": preset("demo"),  # the `make demo` model: dim 128, 4 layers, vocab 8192
    "small": ModelConfig(vocab_size=32768, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                         hidden_dim=1536, max_seq_len=4096),
}


def save_random_hf(config: ModelConfig, path: Path) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**to_hf_config(config, "float32")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    model.save_pretrained(path)
    return path


def timed(fn) -> tuple[float, object]:
    time.sleep(0.5)  # let the other side's idle worker threads stop spinning (they would steal the CPU)
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt length (tokens)")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    import jax
    import torch
    from transformers import AutoModelForCausalLM

    import nemo_jax

    config = MODELS[args.model]
    B, P, N = args.batch, args.prompt, args.new
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (B, P))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_random_hf(config, Path(tmp) / "hf")
        _, params = nemo_jax.load(hf_dir)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def ours(n):
        return lambda: nemo_jax.generate(config, params, prompts.tolist(), n, eos_id=None)

    def theirs(n):
        ids, mask = torch.as_tensor(prompts), torch.ones(B, P, dtype=torch.long)

        def run():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  use_cache=True, pad_token_id=0)
            return out[:, P:].tolist()
        return run

    print(f"$ python benchmarks/generate.py --model {args.model} --batch {B} --prompt {P} --new {N} "
          f"--repeat {args.repeat}")
    print(f"model {args.model}: {config.n_layers} layers, dim {config.dim}, vocab {config.vocab_size}, "
          f"{config.num_params / 1e6:.1f}M params, fp32; batch {B}, prompt {P}, {N} new tokens; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    runs = {(name, n): make(n) for name, make in (("nemo_jax", ours), ("transformers", theirs)) for n in (1, N)}
    outputs = {key: fn() for key, fn in runs.items()}  # warm-up: compiles, caches
    best = {key: float("inf") for key in runs}
    for _ in range(args.repeat):
        for key, fn in runs.items():
            best[key] = min(best[key], timed(fn)[0])
    rates = {}
    for name in ("nemo_jax", "transformers"):
        t1, tn = best[name, 1], best[name, N]
        rates[name] = B * (N - 1) / (tn - t1)
        print(f"{name:13s} decode {rates[name]:9.1f} tokens/s   end-to-end {B * N / tn:9.1f} tokens/s   "
              f"(t({N}) = {tn * 1e3:.0f} ms, t(1) = {t1 * 1e3:.0f} ms)")
    agree = np.mean(np.asarray(outputs["nemo_jax", N]) == np.asarray(outputs["transformers", N]))
    print(f"nemo_jax / transformers decode speed: {rates['nemo_jax'] / rates['transformers']:.2f}x; "
          f"greedy tokens that agree: {100 * agree:.1f}%")


if __name__ == "__main__":
    main()
