"""Conversion memory and speed on a synthetic multi-GB bf16 HF checkpoint.

    .venv/bin/python benchmarks/convert.py [--gb 2.2] [--dir /tmp]

Writes a random HF checkpoint shaped like a scaled-down NeMo (GQA 4:1, head_dim 128, FFN 3.5x,
so the largest stacked tensor is about the same fraction of the model as NeMo's 5.9 of 24.5 GB),
sharded like transformers does, then in the same run and on the same disk:

    cp -r SRC COPY                                  the reference
    python -m nemo_jax.convert import SRC CKPT      HF -> nemo_jax (orbax)
    python -m nemo_jax.convert export CKPT HF2      nemo_jax -> HF

each followed by `sync`, so every time includes getting the bytes to disk. Each conversion is a
fresh process (start-up and JAX import included); its peak RSS is its VmHWM.
Goal: peak RSS <= 0.5x the checkpoint, time <= 3x cp.
The export is checked to give back the source's bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nemo_jax.checkpoint import layout  # noqa: E402
from nemo_jax.checkpoint.safetensors_io import SafetensorsFile  # noqa: E402
from nemo_jax.config import ModelConfig, to_hf_config  # noqa: E402


def bench_config(gb: float) -> ModelConfig:
    """NeMo's proportions at dim 2048; layers chosen to reach `gb` GB in bf16."""
    base = dict(vocab_size=65536, dim=2048, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=7168,
                param_dtype="bfloat16")
    per_layer = ModelConfig(n_layers=2, **base).num_params - ModelConfig(n_layers=1, **base).num_params
    fixed = ModelConfig(n_layers=1, **base).num_params - per_layer
    n_layers = max(1, math.ceil((gb * 1e9 / 2 - fixed) / per_layer))
    return ModelConfig(n_layers=n_layers, **base)


def write_synthetic_hf(config: ModelConfig, out: Path, shard_bytes: int = 500 * 10**6) -> int:
    """Random bf16 weights (finite: the top exponent bit cleared), transformers' layer-major order."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    names = [(leaf, i, leaf.name("hf", i)) for i in [None] + list(range(config.n_layers)) for leaf in layout.LEAVES
             if (i is None) != leaf.stacked]
    names.sort(key=lambda t: (t[1] is not None, t[1] or 0, t[0].hf.startswith("lm_head")))
    shards, current, size = [], {}, 0
    for leaf, i, name in names:
        shape = layout.source_shape(leaf, config)
        current[name] = (rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0xBFFF).view(ml_dtypes.bfloat16)
        size += current[name].nbytes
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(to_hf_config(config, "bfloat16")))
    return total


# Peak RSS is read from the converter's own /proc/self/status VmHWM at exit. The kernel's ru_maxrss
# for a child would be wrong here: it keeps the high-water mark of the memory the child was forked
# from (this script's), which exec does not reset.
_HWM = """
import atexit, os, runpy, sys
def _report():
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    with open(os.environ["NEMO_JAX_BENCH_HWM"], "w") as f:
        f.write(hwm)
atexit.register(_report)
sys.argv = ["nemo_jax.convert"] + sys.argv[1:]
runpy.run_module("nemo_jax.convert", run_name="__main__")
"""


def run(args: list[str], hwm_file: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `python -m nemo_jax.convert ARGS` in a fresh process."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _HWM] + args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, NEMO_JAX_BENCH_HWM=str(hwm_file)))
    elapsed = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"convert {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return elapsed, int(hwm_file.read_text()) * 1024


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_tensors(a: Path, b: Path) -> bool:
    files = {n: f for d in (a,) for f in map(SafetensorsFile, sorted(d.glob("*.safetensors"))) for n in f.entries}
    for f in map(SafetensorsFile, sorted(b.glob("*.safetensors"))):
        for name in f.entries:
            if not np.array_equal(f.read(name).view(np.uint16), files.pop(name).read(name).view(np.uint16)):
                return False
    return not files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.2, help="checkpoint size in GB (default 2.2)")
    p.add_argument("--dir", default=None, help="where to put the temporary files (default: $TMPDIR)")
    args = p.parse_args()

    config = bench_config(args.gb)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nemo_jax_bench_") as tmp:
        tmp = Path(tmp)
        src = tmp / "hf"
        total = write_synthetic_hf(config, src)
        largest = max(math.prod(layout.stacked_shape(leaf, config)) * 2 for leaf in layout.LEAVES)
        n_shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic HF checkpoint: {total / 1e9:.2f} GB bf16 in {n_shards} shards, {config.n_layers} layers, "
              f"largest stacked tensor {largest / 1e9:.2f} GB ({largest / total:.2f}x)")
        subprocess.run(["sync"], check=True)

        cp_runs = []
        for _ in range(3):  # the median of three: copies on a shared VM vary by 2x or more
            cp_runs.append(timed(["cp", "-r", str(src), str(tmp / "copy")]))
            shutil.rmtree(tmp / "copy")
            subprocess.run(["sync"], check=True)
        cp_s = sorted(cp_runs)[1]

        rows = []
        for what, args, out in (("import HF -> nemo_jax", ["import", str(src), str(tmp / "ckpt")], tmp / "ckpt"),
                                ("export nemo_jax -> HF", ["export", str(tmp / "ckpt"), str(tmp / "hf2"),
                                                          "--format", "hf"], tmp / "hf2")):
            t0 = time.perf_counter()
            _, rss = run(args + ["--no-progress"], tmp / "hwm")
            subprocess.run(["sync"], check=True)  # cp's time includes its sync too
            rows.append((what, time.perf_counter() - t0, rss, dir_bytes(out)))
        exact = same_tensors(src, tmp / "hf2")

    print(f"{'cp -r (+sync), median':24s} {cp_s:6.1f} s   (runs: {', '.join(f'{t:.1f}' for t in cp_runs)} s)")
    for what, secs, rss, size in rows:
        print(f"{what:24s} {secs:6.1f} s = {secs / cp_s:4.2f}x cp   peak RSS {rss / 1e9:5.2f} GB = "
              f"{rss / total:4.2f}x checkpoint   (wrote {size / 1e9:.2f} GB)")
    print(f"export gives back the source's tensors bit for bit: {exact}")
    print("goal: peak RSS <= 0.50x checkpoint, time <= 3x cp")


if __name__ == "__main__":
    main()
