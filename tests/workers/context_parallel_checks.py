"""Worker for test_context_parallel.py: runs in its own process so XLA can be given 8 fake CPU devices.

    python context_parallel_checks.py OUT_JSON   (XLA_FLAGS=--xla_force_host_platform_device_count=8)

Records (1) the largest difference of sequence-parallel attention (ring, Ulysses; zigzag and
contiguous layouts) from one device's blockwise kernel, in value and in gradient, on T = 2048
rows of packed documents that cross device boundaries; (2) which collectives the compiled CPU
program of the ring holds; (3) the per-step losses of the tiny model trained on one device and on
sequence-parallel meshes (through trainer.StepSetup.step_fn, which lays the batch out zigzag).
"""

import contextlib
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import context_parallel as CP
from nemo_jax import sharding as S
from nemo_jax.attention import attention
from nemo_jax.config import preset
from nemo_jax.cudnn import Emulated
from nemo_jax.errors import UserError
from nemo_jax.run_config import config_from_dict
from nemo_jax.trainer import init_arrays, make_step_setup

T = 2048


def packed_segments(B, T, seed=0):
    """Rows of documents of random lengths (17..700 tokens: many cross a device's boundary), the
    last row ending in padding; and positions restarting at 0 in each document."""
    rng = np.random.default_rng(seed)
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        end = T - (300 if b == B - 1 else 0)
        t, doc = 0, 1
        while t < end:
            n = min(int(rng.integers(17, 700)), end - t)
            seg[b, t:t + n], pos[b, t:t + n] = doc, np.arange(n)
            t, doc = t + n, doc + 1
    return seg, pos


def attention_inputs(B, N, K, H, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=s), jnp.float32) for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]]


def value_and_grads(attend, q, k, v, w):
    loss = lambda q, k, v: (attend(q, k, v) * w).sum()
    return attend(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)


def sharded(mesh_shape, strategy, zigzag, q, k, v, w, seg):
    """(compiled program, its (output, gradients) in the original order) of sequence-parallel
    attention: the inputs laid out (zigzag or contiguous) on the host, then sharded over the mesh."""
    mesh = S.make_mesh(*mesh_shape)
    n = mesh.shape["sequence"]
    order = CP.zigzag_order(T, n) if zigzag else np.arange(T)
    inverse = np.argsort(order)
    laid_out = [jax.device_put(np.asarray(x)[:, order], S.batch_sharding(mesh)) for x in (q, k, v, w, seg)]

    def f(q, k, v, w, seg):
        with S.activation_mesh(mesh), CP.layout(strategy) if zigzag else contextlib.nullcontext():
            return value_and_grads(lambda q, k, v: attention(q, k, v, seg), q, k, v, w)

    compiled = jax.jit(f).lower(*laid_out).compile()
    if strategy == "allgather":
        return compiled, None
    out, grads = compiled(*laid_out)
    return compiled, (np.asarray(out)[:, inverse], [np.asarray(g)[:, inverse] for g in grads])


def max_err(got, want):
    out, grads = got
    return max([float(jnp.abs(out - want[0]).max())] + [float(jnp.abs(g - h).max()) for g, h in zip(grads, want[1])])


# (name, mesh (data, fsdp, tensor, sequence), strategy, zigzag, N, K, H)
ATTENTION_CASES = [
    ("ring-seq8", (1, 1, 1, 8), "ring", True, 8, 2, 16),
    ("ring-fsdp2-seq4-contiguous", (1, 2, 1, 4), "ring", False, 8, 2, 16),  # outside CP.layout: exact too
    ("ulysses-tensor2-seq4", (1, 1, 2, 4), "ulysses", True, 16, 8, 8),
]


def attention_checks(result):
    """Each case against one device's blockwise kernel; the ring's and XLA's (allgather) CPU programs."""
    seg, _ = packed_segments(2, T)
    seg = jnp.asarray(seg)
    refs = {}
    for name, shape, strategy, zigzag, N, K, H in ATTENTION_CASES:
        q, k, v, w = attention_inputs(2, N, K, H)
        if (N, K, H) not in refs:
            refs[N, K, H] = jax.jit(lambda q, k, v, w: value_and_grads(
                lambda q, k, v: attention(q, k, v, seg, implementation="blockwise"), q, k, v, w))(q, k, v, w)
        compiled, got = sharded(shape, strategy, zigzag, q, k, v, w, seg)
        result["attention_max_err"][name] = max_err(got, refs[N, K, H])
        if name == "ring-seq8":
            result["collectives"]["ring"] = collectives(compiled.as_text())
    q, k, v, w = attention_inputs(2, 8, 2, 16)
    compiled, _ = sharded((1, 1, 1, 8), "allgather", True, q, k, v, w, seg)
    result["collectives"]["allgather"] = collectives(compiled.as_text())
    try:  # 2 kv heads cannot be split over 8 sequence devices
        sharded((1, 1, 1, 8), "ulysses", True, q, k, v, w, seg)
    except UserError as e:
        result["ulysses_error"] = str(e)


@contextlib.contextmanager
def fused_kernels():
    """The fused (GPU) ring, on the emulated kernels."""
    original = CP._hop_kernels
    CP._hop_kernels = lambda head_dim, dtype: Emulated
    try:
        yield
    finally:
        CP._hop_kernels = original


def fused_checks(result):
    """The fused ring and Ulysses against one device's blockwise kernel: packed rows, and one
    document per row (every hop two full rectangles)."""
    packed_seg, _ = packed_segments(2, T)
    for name, shape, strategy, zigzag, N, K, H in FUSED_CASES:
        seg = jnp.ones((2, T), jnp.int32) if name.endswith("one-document") else jnp.asarray(packed_seg)
        q, k, v, w = attention_inputs(2, N, K, H)
        want = jax.jit(lambda q, k, v, w: value_and_grads(
            lambda q, k, v: attention(q, k, v, seg, implementation="blockwise"), q, k, v, w))(q, k, v, w)
        with fused_kernels():
            compiled, got = sharded(shape, strategy, zigzag, q, k, v, w, seg)
        result["attention_max_err"][name] = max_err(got, want)
        if name == "fused-ring-seq8":
            result["collectives"]["fused-ring"] = collectives(compiled.as_text())


FUSED_CASES = [
    ("fused-ring-seq8", (1, 1, 1, 8), "ring", True, 8, 2, 16),
    ("fused-ring-seq8-one-document", (1, 1, 1, 8), "ring", True, 8, 2, 16),
    ("fused-ring-fsdp2-seq4-contiguous", (1, 2, 1, 4), "ring", False, 8, 2, 16),
    ("fused-ulysses-tensor2-seq4", (1, 1, 2, 4), "ulysses", True, 16, 8, 8),
]


def collectives(hlo: str) -> dict:
    """op -> result shapes of each collective instruction in optimized HLO text."""
    out = {}
    for op in ("collective-permute", "all-gather", "all-to-all"):
        out[op] = re.findall(rf"= \(?(\w+\[[0-9,]*\])[^=]*? {op}(?:-start)?\(", hlo)
    return out


CONFIG = preset("tiny")
TRAIN_MESHES = {"single": (1, 1, 1, 1), "seq8": (1, 1, 1, 8), "fsdp2-seq4": (1, 2, 1, 4)}


def train_batches(n=2, B=2):
    rng = np.random.default_rng(1)
    seg, pos = packed_segments(B, T, seed=1)
    out = []
    for _ in range(n):
        ids = rng.integers(3, CONFIG.vocab_size, size=(B, T + 1)).astype(np.int32)
        out.append({"tokens": np.where(seg > 0, ids[:, :-1], 0), "targets": np.where(seg > 0, ids[:, 1:], 0),
                    "loss_mask": (seg > 0).astype(np.float32), "segment_ids": seg, "positions": pos})
    return out


def train(mesh_shape, state, devices=None):
    """Per-step losses and the optimized HLO of the step, from `state` (laid out on this mesh).

    Micro-batches of one row: the CPU projections (model._matmul_cpu) merge B and T into one axis,
    which for B > 1 on a sequence-sharded mesh makes XLA gather the activations whole."""
    d, f, t, s = mesh_shape
    cfg = config_from_dict({
        "output_dir": "unused",
        "model": {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"},
        "data": {"train": ["unused"]},
        "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 1, "seq_len": T, "lr": 1e-2, "loss_chunk": 512,
                  "schedule": "constant"},
        "mesh": {"data": d, "fsdp": f, "tensor": t, "sequence": s, "context_parallel": "ring"},
    })
    setup = make_step_setup(cfg, CONFIG, S.make_mesh(*mesh_shape, devices=devices))
    if state is None:
        return setup
    state = jax.device_put(jax.tree.map(np.asarray, state), setup.state_sh)  # a copy: the step donates it
    batches = [{k: jax.device_put(v, setup.batch_sh) for k, v in b.items()} for b in train_batches()]
    step = setup.step_fn().lower(state, None, batches[0]).compile()
    losses = []
    for b in batches:
        state, m = step(state, None, b)
        losses.append(float(m["loss"]))
    return losses, step.as_text()


def train_checks(result):
    single = jax.devices()[:1]
    state, _ = init_arrays(train(TRAIN_MESHES["single"], None, single), 0, None)
    for name, shape in TRAIN_MESHES.items():
        losses, hlo = train(shape, state, single if name == "single" else None)
        result["losses"][name] = losses
        if name == "seq8":
            result["collectives"]["train-seq8"] = collectives(hlo)


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    result = {"attention_max_err": {}, "collectives": {}, "losses": {}}
    for check in (attention_checks, fused_checks, train_checks):
        t0, c0 = time.perf_counter(), time.process_time()
        check(result)
        result.setdefault("seconds", {})[check.__name__] = (round(time.perf_counter() - t0, 1),
                                                            round(time.process_time() - c0, 1))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
