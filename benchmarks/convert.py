"""Conversion memory and speed on a synthetic multi-GB bf16 HF checkpoint.

    .venv/bin/python benchmarks/convert.py [--gb 2.2] [--dir /tmp]
    .venv/bin/python benchmarks/convert.py --preset mistral-nemo-12b --dir /work/tmp [--load] [--cp-runs 1]

Writes a random bf16 HF checkpoint: with --preset, the full-size model (12B: 24.5 GB in 5 shards,
about 50 GB of disk at the peak); else one shaped like a scaled-down NeMo (GQA 4:1, head_dim 128,
FFN 3.5x, so the largest stacked tensor is about the same fraction of the model as NeMo's 5.9 of
24.5 GB). Sharded like transformers does, then in the same run and on the same disk:

    cp -r SRC COPY                                  the reference
    python -m nemo_jax.convert import SRC CKPT      HF -> nemo_jax (orbax)
    python -m nemo_jax.convert export CKPT HF2      nemo_jax -> HF

each followed by `sync`, so every time includes getting the bytes to disk. Each conversion is a
fresh process (start-up and JAX import included). Its heap is the peak of its anonymous RSS
(RssAnon, sampled every 10 ms: page cache and mapped files excluded); VmHWM, which counts mapped
file pages too, is shown beside it. Goal: heap <= 0.5x the checkpoint, time <= 3x cp.
The source is deleted once imported (so that three copies never share the disk), and the export
is checked bit for bit against the same random tensors drawn again. `--load` also measures
benchmarks/load.py (a restore onto 8 CPU devices, fsdp=8) of the HF source and of the import.
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
from nemo_jax.checkpoint.safetensors_io import Writer  # noqa: E402
from nemo_jax.config import ModelConfig, preset, to_hf_config  # noqa: E402


def bench_config(gb: float, preset_name: str | None = None) -> ModelConfig:
    """The preset in bf16, else NeMo's proportions at dim 2048 with layers chosen to reach `gb` GB."""
    if preset_name:
        return preset(preset_name).replace(param_dtype="bfloat16", dtype="bfloat16")
    base = dict(vocab_size=65536, dim=2048, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=7168,
                param_dtype="bfloat16")
    per_layer = ModelConfig(n_layers=2, **base).num_params - ModelConfig(n_layers=1, **base).num_params
    fixed = ModelConfig(n_layers=1, **base).num_params - per_layer
    n_layers = max(1, math.ceil((gb * 1e9 / 2 - fixed) / per_layer))
    return ModelConfig(n_layers=n_layers, **base)


def synthetic_tensors(config: ModelConfig):
    """(name, shape, make) in transformers' layer-major order; make() draws the tensor: random bf16
    (finite: the top exponent bit cleared), the same every time they are drawn in this order."""
    rng = np.random.default_rng(0)
    names = [(leaf, i, leaf.name("hf", i)) for i in [None] + list(range(config.n_layers)) for leaf in layout.LEAVES
             if (i is None) != leaf.stacked]
    names.sort(key=lambda t: (t[1] is not None, t[1] or 0, t[0].hf.startswith("lm_head")))
    for leaf, _, name in names:
        shape = layout.source_shape(leaf, config)
        yield name, shape, lambda shape=shape: (
            rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0xBFFF).view(ml_dtypes.bfloat16)


def write_synthetic_hf(config: ModelConfig, out: Path, shard_bytes: int = 500 * 10**6) -> int:
    """The synthetic checkpoint, one tensor in memory at a time; returns its tensor bytes."""
    shards, size = [[]], 0
    for name, shape, make in synthetic_tensors(config):
        shards[-1].append((name, shape, make))
        size += math.prod(shape) * 2
        if size >= shard_bytes:
            shards.append([])
            size = 0
    shards = [s for s in shards if s]
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, ml_dtypes.bfloat16, shape) for name, shape, _ in tensors]
        with Writer(out / fname, entries, metadata={"format": "pt"}) as w:
            for name, shape, make in tensors:
                w.write(name, make())
                total += math.prod(shape) * 2
        weight_map.update({name: fname for name, _, _ in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(to_hf_config(config, "bfloat16")))
    return total


# The peaks are read inside the converter: a thread samples its RssAnon, and VmHWM comes from its
# /proc/self/status at exit. The kernel's ru_maxrss for a child would be wrong here: it keeps the
# high-water mark of the memory the child was forked from (this script's), which exec does not reset.
_PEAKS = """
import atexit, os, runpy, sys, threading, time
def _status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key + ":")][0].split()[1]) * 1024
_anon = [0]
def _sample():
    while True:
        _anon[0] = max(_anon[0], _status("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=_sample, daemon=True).start()
def _report():
    _anon[0] = max(_anon[0], _status("RssAnon"))
    with open(os.environ["NEMO_JAX_BENCH_PEAKS"], "w") as f:
        f.write(f"{_anon[0]} {_status('VmHWM')}")
atexit.register(_report)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def run(module: str, args: list[str], peaks_file: Path, env: dict | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, peak anonymous RSS, VmHWM, stdout) of `python -m MODULE ARGS` in a fresh process."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PEAKS, module] + args, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, NEMO_JAX_BENCH_PEAKS=str(peaks_file), **(env or {})))
    elapsed = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    anon, hwm = map(int, peaks_file.read_text().split())
    return elapsed, anon, hwm, r.stdout


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_tensors(config: ModelConfig, exported: Path) -> bool:
    """Whether `exported` holds exactly the synthetic tensors (drawn again, one at a time)."""
    files = {n: f for f in map(SafetensorsFile, sorted(exported.glob("*.safetensors"))) for n in f.entries}
    for name, _, make in synthetic_tensors(config):
        if name not in files or not np.array_equal(files.pop(name).read(name).view(np.uint16), make().view(np.uint16)):
            return False
    return not files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.2, help="checkpoint size in GB (default 2.2)")
    p.add_argument("--preset", help="the full-size model instead (e.g. mistral-nemo-12b)")
    p.add_argument("--dir", default=None, help="where to put the temporary files (default: $TMPDIR)")
    p.add_argument("--cp-runs", type=int, default=3, help="copies timed, the median taken (default 3)")
    p.add_argument("--load", action="store_true", help="also benchmarks/load.py of the source and the import")
    args = p.parse_args()

    config = bench_config(args.gb, args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nemo_jax_bench_") as tmp:
        tmp = Path(tmp)
        src = tmp / "hf"
        # transformers' own shards for a preset (NeMo 12B: 5 files), else many small ones
        total = write_synthetic_hf(config, src, 5 * 10**9 if args.preset else 500 * 10**6)
        largest = max(math.prod(layout.stacked_shape(leaf, config)) * 2 for leaf in layout.LEAVES)
        n_shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic HF checkpoint: {total / 1e9:.2f} GB bf16 in {n_shards} shards, {config.n_layers} layers, "
              f"largest stacked tensor {largest / 1e9:.2f} GB ({largest / total:.2f}x)", flush=True)
        subprocess.run(["sync"], check=True)

        cp_runs = []
        for _ in range(args.cp_runs):  # the median: copies on a shared VM vary by 2x or more
            cp_runs.append(timed(["cp", "-r", str(src), str(tmp / "copy")]))
            shutil.rmtree(tmp / "copy")
            subprocess.run(["sync"], check=True)
        cp_s = sorted(cp_runs)[len(cp_runs) // 2]
        print(f"{'cp -r (+sync), median':24s} {cp_s:6.1f} s   (runs: {', '.join(f'{t:.1f}' for t in cp_runs)} s)",
              flush=True)

        def convert(what, cli_args, out):
            t0 = time.perf_counter()
            _, anon, hwm, _ = run("nemo_jax.convert", cli_args + ["--no-progress"], tmp / "peaks")
            subprocess.run(["sync"], check=True)  # cp's time includes its sync too
            secs = time.perf_counter() - t0
            print(f"{what:24s} {secs:6.1f} s = {secs / cp_s:4.2f}x cp   heap (anon RSS) {anon / 1e9:5.2f} GB = "
                  f"{anon / total:4.2f}x checkpoint   VmHWM {hwm / 1e9:5.2f} GB   (wrote {dir_bytes(out) / 1e9:.2f} GB)",
                  flush=True)

        convert("import HF -> nemo_jax", ["import", str(src), str(tmp / "ckpt")], tmp / "ckpt")
        if args.load:
            for what in (src, tmp / "ckpt"):
                _, anon, hwm, out = run("benchmarks.load", [str(what)], tmp / "peaks",
                                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
                print(out, end="")
                print(f"  (process peak: anon RSS {anon / 1e9:.2f} GB, VmHWM {hwm / 1e9:.2f} GB)", flush=True)
        shutil.rmtree(src)
        convert("export nemo_jax -> HF", ["export", str(tmp / "ckpt"), str(tmp / "hf2"), "--format", "hf"],
                tmp / "hf2")
        shutil.rmtree(tmp / "ckpt")
        print(f"export gives back the source's tensors bit for bit: {same_tensors(config, tmp / 'hf2')}")
    print("goal: heap <= 0.50x checkpoint, time <= 3x cp")


if __name__ == "__main__":
    main()
