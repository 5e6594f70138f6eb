"""Worker for test_sharding.py: runs in its own process so XLA can be given 8 fake CPU devices.

    python sharded_steps.py OUT_JSON   (XLA_FLAGS=--xla_force_host_platform_device_count=8)

For each case (mesh shape x full/LoRA) trains 3 steps on fixed batches from the same init and records
the per-step losses, next to the same run on one device; checks that FSDP really shards; saves a
checkpoint on one mesh and restores it on another.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from nemo_jax import model as M
from nemo_jax import sharding as S
from nemo_jax.checkpoint import runs
from nemo_jax.run_config import config_from_dict
from nemo_jax.trainer import init_arrays, make_step_setup
from nemo_jax.config import preset

MESHES = {"data8": (8, 1, 1, 1), "fsdp8": (1, 8, 1, 1), "2x2x2": (2, 2, 2, 1), "1x2x4": (1, 2, 4, 1),
          "seq4": (1, 2, 1, 4)}
LORA_MESHES = ("fsdp8", "2x2x2")  # LoRA changes what is trained, not how the mesh axes split it
UNROLLED = ("2x2x2",)  # the layer loop unrolled: the step's per-layer arrays (trainer.StepSetup.unstacked)
CONFIG = preset("tiny").replace(dim=64, n_heads=8, n_kv_heads=2, head_dim=16, hidden_dim=256)


def run_config(mesh, lora, unroll=1, qlora=False):
    d, f, t, s = mesh
    model = {"preset": "tiny", "dtype": "float32", "param_dtype": "float32", "scan_unroll": unroll}
    # QLoRA (an NF4 base with double-quantised scales, or INT8) with remat: codes shard like the kernels
    extra = {"quantize_base": "nf4", "double_quant": True} if qlora == "nf4" else \
        {"quantize_base": "int8"} if qlora == "int8" else {}
    return config_from_dict({
        "output_dir": "unused",
        "model": {**model, "remat": "full"} if qlora else model,
        "data": {"train": ["unused"]},
        "train": {"steps": 3, "batch_size": 8, "micro_batch_size": 8, "seq_len": 32, "lr": 1e-2, "loss_chunk": 16,
                  "schedule": "constant"},
        "lora": {"enabled": lora, "rank": 4, **extra},
        "mesh": {"data": d, "fsdp": f, "tensor": t, "sequence": s},
    })


def batches(n=3, B=8, T=32):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(3, CONFIG.vocab_size, size=(B, T + 1)).astype(np.int32)
        seg = np.ones((B, T), np.int32)
        seg[:, T // 2:] = 2  # two packed documents per row
        pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
        out.append({"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32),
                    "segment_ids": seg, "positions": pos})
    return out


def train(mesh_shape, lora, devices=None, unroll=1, qlora=False):
    cfg = run_config(mesh_shape, lora, unroll, qlora)
    mesh = S.make_mesh(*mesh_shape, devices=devices)
    setup = make_step_setup(cfg, CONFIG, mesh)
    state, frozen = init_arrays(setup, 0, None)
    step = setup.step_fn()
    losses = []
    for b in batches():
        b = {k: jax.device_put(v, setup.batch_sh) for k, v in b.items()}
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
    return losses, state, frozen, setup


def max_shard_fraction(tree):
    """Largest fraction of a big parameter that one device holds."""
    fr = []
    for x in jax.tree.leaves(tree):
        if x.size >= 4096:
            fr.append(max(s.data.size for s in x.addressable_shards) / x.size)
    return max(fr)


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    result = {"losses": {}}
    for lora in (False, True):
        ref, *_ = train((1, 1, 1, 1), lora, devices=jax.devices()[:1])
        result["losses"][f"single-{'lora' if lora else 'full'}"] = ref
        for name, shape in MESHES.items():
            if lora and name not in LORA_MESHES:
                continue
            losses, state, frozen, setup = train(shape, lora, unroll=CONFIG.n_layers if name in UNROLLED else 1)
            assert setup.unstacked == (name in UNROLLED)
            if name in UNROLLED:  # each layer's arrays keep the stacked array's sharding of their axes
                q = (frozen if lora else state["trainable"])["layers"][0]["attention"]["q"]["kernel"]
                result[f"unrolled_q_sharding_{'lora' if lora else 'full'}"] = str(q.sharding.spec)
            result["losses"][f"{name}-{'lora' if lora else 'full'}"] = losses
            if name == "fsdp8":
                tree = frozen if lora else state["trainable"]
                result[f"fsdp8_max_shard_fraction_{'lora' if lora else 'full'}"] = max_shard_fraction(tree)
                result[f"fsdp8_opt_shard_fraction_{'lora' if lora else 'full'}"] = max_shard_fraction(
                    state["opt_state"]) if not lora else None
            if name == "fsdp8" and not lora:
                saved_state, saved_setup = state, setup
    for kind, meshes in (("nf4", LORA_MESHES), ("int8", ("fsdp8",))):
        ref, *_ = train((1, 1, 1, 1), True, devices=jax.devices()[:1], qlora=kind)
        result["losses"][f"single-qlora-{kind}"] = ref
        for name in meshes:
            losses, state, frozen, setup = train(MESHES[name], True, qlora=kind,
                                                  unroll=CONFIG.n_layers if name in UNROLLED else 1)
            result["losses"][f"{name}-qlora-{kind}"] = losses
            assert setup.unstacked == (name in UNROLLED)
            if name == "fsdp8":
                codes = frozen["layers"]["mlp"]["down"]["codes" if kind == "nf4" else "int8"]
                result[f"fsdp8_qlora_{kind}_codes"] = [str(codes.dtype), max_shard_fraction(codes)]
    # an NF4 base read from a checkpoint leaf by leaf onto fsdp=8, quantised there: one device's NF4 of it
    from nemo_jax import quant_base
    from nemo_jax.checkpoint.orbax_io import save_orbax
    from nemo_jax.trainer import restore_quantized_base

    base = M.init_params(CONFIG, jax.random.key(3))["params"]
    quant = quant_base.BaseQuant("nf4", True)
    want = jax.jit(quant_base.quantize_params, static_argnums=(1, 2))(base, M.LORA_TARGETS, quant)
    with tempfile.TemporaryDirectory() as d:
        save_orbax(f"{d}/base", CONFIG, base)
        cfg = run_config(MESHES["fsdp8"], True, qlora="nf4")
        got = restore_quantized_base(f"{d}/base", make_step_setup(cfg, CONFIG, S.make_mesh(*MESHES["fsdp8"])), None)
    result["qlora_restore_fsdp8"] = [
        all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))),
        max_shard_fraction(got["layers"]["attention"]["q"]["codes"])]
    # save on fsdp=8, restore on 2x2x2 and compare values
    with tempfile.TemporaryDirectory() as d:
        mngr = runs.checkpoint_manager(d, keep=1, async_save=False)
        runs.save_checkpoint(mngr, 3, saved_setup.to_checkpoint(saved_state), {"step": 3})
        mngr.wait_until_finished()
        target = make_step_setup(run_config(MESHES["2x2x2"], False), CONFIG, S.make_mesh(*MESHES["2x2x2"]))
        restored, _ = runs.restore_checkpoint(mngr, 3, target.abstract_state())
        # and into an unrolled run's layout on that mesh
        unrolled = make_step_setup(run_config(MESHES["2x2x2"], False, CONFIG.n_layers), CONFIG,
                                   S.make_mesh(*MESHES["2x2x2"]))
        per_layer = unrolled.from_checkpoint(restored)
        result["restored_unrolled_equal"] = all(
            bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
            zip(jax.tree.leaves(saved_state["trainable"]), jax.tree.leaves(M.stack_layers(per_layer["trainable"]))))
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            saved_state["trainable"], restored["trainable"])
        result["restore_other_mesh_equal"] = all(jax.tree.leaves(same))
        q = restored["trainable"]["layers"]["attention"]["q"]["kernel"]
        result["restored_sharding"] = str(q.sharding.spec)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
