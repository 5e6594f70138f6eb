"""FP8 checkpoints in the HF layout: `export --format hf-fp8` and reading them back.

The export is what vLLM, TensorRT-LLM (via llm-compressor checkpoints) and transformers with
compressed-tensors load as a static per-tensor FP8 model:

    model.layers.{i}.self_attn.q_proj.weight         float8_e4m3fn [out, in]
    model.layers.{i}.self_attn.q_proj.weight_scale   float32 [1]     dequant = fp8 x weight_scale
    model.layers.{i}.self_attn.q_proj.input_scale    float32 [1]     static activation scale

for every targeted q/k/v/o/gate/up/down (and lm_head if targeted); embeddings, norms and the LM
head stay bf16, and config.json carries a compressed-tensors `quantization_config` (format
`float-quantized`, strategy `tensor`, symmetric, static activations). Weight scales are exactly
those the QAT forward used (fp8.weight_scales: amax / 448, shared by q/k/v and by gate/up), so
fp8(W) x weight_scale is bitwise the qdq(W) training saw. Input scales come from the run's trained
amax state, or for a model trained without FP8 (post-training quantisation) from a calibration
pass over `--calibration-data`: `ExportOptions.calibrate`, which the CLI sets to calibration.py's
(it runs the model on data, which is the layers above this one's to do).

Reading: fp8_format.py parses the `quantization_config` (this form and vLLM's); sources.py
dequantises such checkpoints on load, and `load_fp8_export` keeps them in FP8 for an evaluation
that simulates the served model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nemo_jax import fp8
from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.host import Scratch
from nemo_jax.checkpoint.fp8_format import quantization_config
from nemo_jax.checkpoint.safetensors_io import Writer
from nemo_jax.checkpoint.sources import HF_CONFIG, HF_INDEX, SafetensorsSource, progress_bar
from nemo_jax.config import ModelConfig, target_at, to_hf_config
from nemo_jax.errors import UserError

E4M3_NP = np.dtype(ml_dtypes.float8_e4m3fn)


# --- export -------------------------------------------------------------------------------------------


def _scales_and_inputs(source, config: ModelConfig, spec: fp8.Fp8Spec, opts) -> tuple[dict, dict]:
    """{target: weight scales}, {target: input scales} as numpy ([L] for layer targets)."""
    amaxes = {}  # one leaf in memory at a time; max|W| is exact in any dtype
    for leaf in layout.LEAVES:
        t = target_at(leaf.path)
        if t in spec.targets:
            x = source.read_leaf(leaf, "float32")
            amaxes[t] = np.abs(x).max(axis=tuple(range(1, x.ndim)) if leaf.stacked else None)
            del x
    for t in spec.targets:
        group = spec.shared_group(t)
        if group:
            amaxes[t] = np.max([amaxes[u] for u in group], axis=0)
    # the very function the QAT forward computes its weight scales with: bitwise the same scales
    w_scales = {t: np.asarray(jax.jit(fp8.weight_scale)(jnp.asarray(a, jnp.float32))) for t, a in amaxes.items()}
    state = getattr(source, "fp8_state", None)
    if state is None:
        if not getattr(opts, "calibration", ()):
            raise UserError(f"{source.path}: --format hf-fp8 needs static input scales: this checkpoint was not "
                            "trained with FP8, so give --calibration-data FILE (post-training quantisation)")
        if opts.calibrate is None:
            raise UserError("--format hf-fp8: post-training quantisation needs a calibration pass "
                            "(ExportOptions.calibrate; python -m nemo_jax.convert sets it)")
        state = opts.calibrate(source, config, spec, opts)
    inputs = {t: np.asarray(fp8.site_state(state, t)["x"]["scale"], np.float32) for t in spec.targets}
    return w_scales, inputs


def export_hf_fp8(source, out: Path, opts) -> None:
    config = source.config_for(None)
    run_spec = getattr(source, "fp8_spec", None)
    spec = run_spec or fp8.Fp8Spec(recipe="delayed", amax_history=1)
    spec = dataclasses.replace(spec, quantize_grads=False, base_fp8=False)
    dense_dtype = opts.dtype or "bfloat16"
    dense_np = np.dtype(jnp.dtype(dense_dtype))
    w_scales, in_scales = _scales_and_inputs(source, config, spec, opts)

    entries: list[tuple[str, np.dtype, tuple[int, ...], tuple]] = []  # name, dtype, shape, what
    for leaf, i, name in layout.tensor_names("hf", config):
        t = target_at(leaf.path)
        shape = layout.source_shape(leaf, config)
        if t in spec.targets:
            entries.append((name, E4M3_NP, shape, ("weight", leaf, i, t)))
            prefix = name[: -len(".weight")]
            entries.append((prefix + ".weight_scale", np.dtype(np.float32), (1,), ("wscale", leaf, i, t)))
            entries.append((prefix + ".input_scale", np.dtype(np.float32), (1,), ("iscale", leaf, i, t)))
        else:
            entries.append((name, dense_np, shape, ("dense", leaf, i, t)))
    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + nbytes > opts.max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = sum(math.prod(e[2]) * e[1].itemsize for e in entries)
    quantize = jax.jit(lambda x, s: fp8.quantize(x, s, fp8.E4M3))
    scratch, current, value = Scratch(), None, None
    with progress_bar(total, opts.progress, "export hf-fp8") as bar:
        for f, shard in zip(files, shards):
            with Writer(out / f, [(n, d, s) for n, d, s, _ in shard], metadata={"format": "pt"}) as w:
                for name, dt, shape, (kind, leaf, i, t) in shard:
                    if kind in ("wscale", "iscale"):
                        s = (w_scales if kind == "wscale" else in_scales)[t]
                        w.write(name, np.asarray(s if i is None else s[i], np.float32).reshape(1))
                        continue
                    if leaf is not current:
                        current, value = leaf, None
                        value = source.read_leaf(leaf, "float32" if kind == "weight" else dense_dtype)
                    x = value[i] if leaf.stacked else value
                    if kind == "weight":
                        s = w_scales[t] if i is None else w_scales[t][i]
                        x = np.asarray(quantize(x, np.float32(s)))
                    w.write(name, layout.from_ours(leaf, "hf", x, config, scratch))
                    bar.update(x.nbytes)
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted((e[0], f) for f, s in zip(files, shards) for e in s))}
    (out / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    hf = to_hf_config(config, dense_dtype)
    hf["quantization_config"] = quantization_config(config, spec.targets)
    (out / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")


# --- reading an FP8 export for simulated evaluation ------------------------------------------------------


def is_fp8_checkpoint(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def load_fp8_export(path: Path) -> tuple[ModelConfig, dict, fp8.Fp8Spec, dict]:
    """(config, params, spec, state) of an FP8 HF checkpoint, its quantised kernels kept in e4m3 with
    their weight scales and input scales in the state: `forward(..., fp8=Fp8Scaling(spec, state))` is
    the served model's computation (static input quantisation, e4m3 x scale weights)."""
    path = Path(path)
    source = SafetensorsSource(path, "hf")
    if source.fp8 is None:
        raise UserError(f"{path}: not an FP8 checkpoint (no quantization_config in {HF_CONFIG})")
    fmt, files, config = source.fp8, source.files, source.config_for(None)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = source.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                         source.abstract(None)))  # dequantised; the quantised kernels replaced below
    if not fmt.static_inputs:
        raise UserError(f"{path}: dynamic activation scales; simulated evaluation needs static input_scale tensors")
    spec = fp8.Fp8Spec(recipe="delayed", amax_history=1, targets=fmt.targets, base_fp8=True, quantize_grads=False)
    state, _ = _init_state(config, spec)
    params = jax.tree.map(lambda x: x, params)
    state = jax.tree.map(lambda x: x, state)
    scratch = Scratch()
    for leaf in layout.LEAVES:
        t = target_at(leaf.path)
        if t not in fmt.targets:
            continue
        layers = range(config.n_layers) if leaf.stacked else [None]
        kern = np.empty(layout.stacked_shape(leaf, config), E4M3_NP)
        ws, xs = np.empty(len(layers), np.float32), np.empty(len(layers), np.float32)
        for j, i in enumerate(layers):
            name = leaf.name("hf", i)
            f = files[name]
            prefix = name[: -len(".weight")]
            ws[j] = files[prefix + ".weight_scale"].read(prefix + ".weight_scale").reshape(-1)[0]
            xs[j] = files[prefix + ".input_scale"].read(prefix + ".input_scale").reshape(-1)[0]
            e = f.entries[name]
            out = kern[j] if leaf.stacked else kern
            layout.to_ours(leaf, "hf", lambda r0, r1: f.read(name, rows=(r0, r1)).view(e.dtype), config, out, scratch)
        site = fp8.site_state(state, t)
        one = (lambda a: a) if leaf.stacked else (lambda a: a[0])
        site["weight_scale"] = jnp.asarray(one(ws))
        site["x"] = {"amax_history": jnp.asarray(one(xs))[..., None] * fp8.fp8_max(fp8.E4M3),
                     "scale": jnp.asarray(one(xs))}
        node = params
        for k in leaf.path[:-1]:
            node = node[k]
        node[leaf.path[-1]] = jnp.asarray(kern)
    return config, params, spec, state


def _init_state(config: ModelConfig, spec: fp8.Fp8Spec):
    from nemo_jax import model

    return model.init_fp8(config, spec)
