"""Context-parallel attention (ring) against XLA's all-gathered keys/values, per device, on mesh.sequence 8.

    .venv/bin/python benchmarks/context_parallel.py [--target h100|cpu] [--seq 131072] [--step]

Compiles one attention layer, forward and backward (what a training step runs per layer), with
NeMo's heads (32 query / 8 kv of 128, bf16) on one row of --seq tokens for 8 devices: deviceless
H100s (the aot extra) or 8 fake CPU devices. Two programs: "ring" (context_parallel.py, zigzag
layout) and "allgather" (attention.py's blockwise kernel left to XLA's partitioner, the behaviour
before). Reported per device:

* communication: the bytes each device receives, read from the optimized HLO: every
  collective-permute / all-gather / all-to-all / all-reduce result, times the trip count of the
  while loops around it (XLA's known_trip_count); an all-gather receives (g-1)/g of its result.
* attention FLOPs actually executed: the kernels skip key blocks that lie in the causal future
  (lax.cond / loop bounds, which a static HLO count cannot see), so they are counted from the
  kernels' own block schedule for one document per row: 4·bq·bk·N·H per visited block pair
  forward, 10·bq·bk·N·H backward (FlashAttention-2's five matmuls).
* XLA's memory analysis of the program (temporaries, arguments, outputs).

--step also compiles the whole train step of a 2-layer model of NeMo's attention width
(dim 1024, the 12B's heads) at --seq tokens, both ways, and prints its collective bytes and
memory (the CPU planner's numbers on --target cpu).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_DEVICES = 8
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
COLLECTIVES = ("collective-permute", "all-gather", "all-to-all", "all-reduce", "reduce-scatter")


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, entry = {}, None
    for block in re.split(r"\n(?=\S)", hlo):
        m = re.match(r"(ENTRY )?%?([\w.\-]+)", block)
        if not m or "{" not in block.split("\n", 1)[0]:
            continue
        comps[m.group(2)] = block.split("\n")[1:]
        if m.group(1):
            entry = m.group(2)
    return comps, entry


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[[0-9]+,([0-9]+)\]<=", line)
    return int(m.group(1)) if m else default


def collective_bytes(hlo: str, n_devices: int = N_DEVICES) -> tuple[dict[str, float], bool]:
    """(op -> bytes one device receives over the program, loops unrolled by their known trip counts;
    whether some collective sits in a loop of unknown trip count, counted once: a lower bound)."""
    comps, entry = _computations(hlo)
    out: dict[str, float] = defaultdict(float)
    unknown = [False]

    def visit(name: str, mult: int, exact: bool = True):
        for line in comps.get(name, []):
            if "=" not in line:
                continue
            rhs = line.split("=", 1)[1]
            m = re.search(r"\s([a-z][\w\-]*)\(", rhs)
            op = m.group(1) if m else ""
            base = op.removesuffix("-done")
            if base in COLLECTIVES and not op.endswith("-start"):
                if op.endswith("-done"):  # the groups are on the start's line
                    start = re.search(r"-done\(%?([\w.\-]+)", rhs).group(1)
                    line = next((x for x in comps[name] if re.match(rf"\s*(ROOT )?%{re.escape(start)} =", x)), line)
                g = _group_size(line, n_devices)
                share = {"collective-permute": 1.0, "all-gather": (g - 1) / g, "all-to-all": (g - 1) / g,
                         "all-reduce": 2 * (g - 1) / g, "reduce-scatter": g - 1}[base]
                out[base] += mult * _bytes(rhs.split(op + "(")[0]) * share
                unknown[0] |= not exact
            if op == "while":
                trip = re.search(r'known_trip_count":\{"n":"(\d+)"', rhs)
                visit(re.search(r"body=%?([\w.\-]+)", rhs).group(1), mult * (int(trip.group(1)) if trip else 1),
                      exact and trip is not None)
                continue
            callees = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", rhs)
            branches = re.search(r"branch_computations=\{([^}]*)\}", rhs)
            if branches:
                callees += re.findall(r"%?([\w.\-]+)", branches.group(1))
            for c in callees:
                visit(c, mult, exact)

    visit(entry, 1)
    return dict(out), unknown[0]


def attention_flops(T: int, n: int, N: int, H: int, ring: bool, block: int = 512) -> float:
    """FLOPs one device executes (forward + backward) for one document of T tokens: the visited
    block pairs of the ring's schedule (zigzag, n hops) or of attention.py's blockwise kernel on
    the whole row (what every device runs when XLA gathers the keys)."""
    import numpy as np

    from nemo_jax import context_parallel as CP

    per_pair = 14 * N * H  # x bq x bk: 4 forward + 10 backward
    if not ring:
        nb = -(-T // block)
        return sum(i + 1 for i in range(nb)) * block * block * per_pair
    idx = CP.zigzag_order(T, n).reshape(n, -1)
    b = CP._block_size(T // (2 * n))
    lo, hi = idx.reshape(n, -1, b).min(-1), idx.reshape(n, -1, b).max(-1)  # [shard, block]
    pairs = [int((lo[s][None, :] <= hi[0][:, None]).sum()) for s in range(n)]  # device 0 against every shard
    return float(np.sum(pairs)) * b * b * per_pair


def compile_attention(devices, T, strategy, dtype):
    import jax
    import jax.numpy as jnp

    from nemo_jax import context_parallel as CP
    from nemo_jax import sharding as S
    from nemo_jax.attention import attention

    mesh = S.make_mesh(sequence=N_DEVICES, devices=list(devices))
    sh = S.batch_sharding(mesh)
    arg = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    args = (arg(1, T, 32, 128), arg(1, T, 8, 128), arg(1, T, 8, 128), arg(1, T, dt=jnp.int32))
    implementation = "blockwise" if strategy == "allgather" else "auto"

    def f(q, k, v, seg):
        with S.activation_mesh(mesh), CP.layout(strategy):
            out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg, implementation=implementation), q, k, v)
            return out, vjp(out)

    return jax.jit(f).lower(*args).compile()


def compile_step(devices, T, strategy, dtype):
    import jax
    import jax.numpy as jnp

    from nemo_jax import sharding as S
    from nemo_jax import train_loop as TL
    from nemo_jax.config import ModelConfig
    from nemo_jax.run_config import config_from_dict
    from nemo_jax.trainer import make_step_setup

    config = ModelConfig(vocab_size=8192, dim=1024, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=128,
                         hidden_dim=2048, max_seq_len=T, dtype=dtype, param_dtype="float32")
    cfg = config_from_dict({
        "output_dir": "unused", "model": {"preset": "tiny", "dtype": dtype}, "data": {"train": ["unused"]},
        "train": {"steps": 1, "batch_size": 1, "seq_len": T, "lr": 1e-4, "loss_chunk": 2048},
        "lora": {"enabled": True, "rank": 16},
        "mesh": {"sequence": N_DEVICES, "context_parallel": strategy}})
    setup = make_step_setup(cfg, config, S.make_mesh(sequence=N_DEVICES, devices=list(devices)))
    state, frozen = setup.abstract_step_inputs()
    batch = {k: jax.ShapeDtypeStruct((1, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=setup.batch_sh)
             for k in TL.BATCH_KEYS}
    return setup.step_fn().lower(state, frozen, batch).compile()


def report(name, compiled, seconds, flops=None):
    mem = compiled.memory_analysis()
    comm, lower_bound = collective_bytes(compiled.as_text())
    row = {"comm": comm, "total": sum(comm.values()), "temp": mem.temp_size_in_bytes,
           "args": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes, "flops": flops}
    parts = ", ".join(f"{op} {b / 2**20:,.0f} MiB" for op, b in sorted(comm.items()) if b)
    at_least = ">=" if lower_bound else "  "
    print(f"  {name:<10} compile {seconds:5.1f} s | received {at_least}{row['total'] / 2**20:9,.0f} MiB "
          f"({parts or 'none'}{'; loops of unknown trip count counted once' if lower_bound else ''})")
    print(f"  {'':<10} memory: temporaries {row['temp'] / 2**30:.2f} GiB, arguments {row['args'] / 2**30:.2f} GiB, "
          f"outputs {row['out'] / 2**30:.2f} GiB" + (f" | attention {flops / 1e12:,.1f} TFLOP" if flops else ""))
    return row


def ratios(ring, base):
    r = lambda a, b: f"{a / b:.3f}" if b else "n/a"
    line = f"  ring / allgather: bytes received {r(ring['total'], base['total'])}, temporaries {r(ring['temp'], base['temp'])}"
    if ring["flops"]:
        line += f", attention FLOPs {r(ring['flops'], base['flops'])}"
    print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, choices=["h100", "cpu"], help="default: h100 with the aot extra, else cpu")
    ap.add_argument("--seq", type=int, default=None, help="tokens in the row (default 131072 on h100, 16384 on cpu)")
    ap.add_argument("--step", action="store_true", help="also compile the train step of a 2-layer model")
    args = ap.parse_args()

    from nemo_jax import aot

    target = args.target or ("h100" if aot.available() else "cpu")
    if target == "cpu":
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    aot.use_cpu_backend()
    import jax

    devices = aot.devices("h100", N_DEVICES) if target == "h100" else jax.devices()[:N_DEVICES]
    T = args.seq or (131072 if target == "h100" else 16384)
    dtype = "bfloat16"
    print(f"{target} x {N_DEVICES}, mesh.sequence {N_DEVICES}, one row of {T:,} tokens, 32/8 heads of 128, {dtype}")
    print(f"attention layer, forward + backward (per device):")
    rows = {}
    for strategy in ("ring", "allgather"):
        t0 = time.perf_counter()
        compiled = compile_attention(devices, T, strategy, dtype)
        flops = attention_flops(T, N_DEVICES, 32, 128, ring=strategy == "ring")
        rows[strategy] = report(strategy, compiled, time.perf_counter() - t0, flops)
    ratios(rows["ring"], rows["allgather"])
    if args.step:
        print(f"LoRA train step, 2 layers of dim 1024 with NeMo's heads (per device):")
        for strategy in ("ring", "allgather"):
            t0 = time.perf_counter()
            rows[strategy] = report(strategy, compile_step(devices, T, strategy, dtype), time.perf_counter() - t0)
        ratios(rows["ring"], rows["allgather"])


if __name__ == "__main__":
    main()
