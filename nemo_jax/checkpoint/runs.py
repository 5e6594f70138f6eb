"""Training run directories: the checkpoints a run writes and reads back, and runs as checkpoints.

A run directory (`output_dir`) holds:
    run.json            what the run is: model config, LoRA spec, FP8 spec, base checkpoint reference
    config.yaml         the resolved run config
    checkpoints/<step>/ orbax: `state` (step, trainable, opt_state, rng[, fp8]) and `meta` (data
                        iterator state, config); orbax writes each into a temporary directory and
                        renames it when complete, so resume never picks up a half-written step
    metrics.jsonl, tb/, loss.png
The trainer writes it through `checkpoint_manager` / `save_checkpoint` and resumes with
`restore_checkpoint`; this module knows the layout, not the training.

Everything that uses a finished (or stopped) run reads it through `load_run` / `load_run_fp8`:
eval.py, export, nemo_jax.load, chat. They read only parameters (the model or the adapters, and the
FP8 scales), never the optimizer state, each array straight into the shardings of the mesh asked
for (by default the first device), so a run trained on any mesh and any number of hosts is usable
from any device count.

A run's newest checkpoint holds either the whole model (full fine-tuning) or only LoRA adapters
plus a reference to the base (run.json). `RunSource` serves the model weights with the adapters
merged, and keeps the adapters themselves for `export --format peft`. The config and the tree's
shapes come from run.json, so `load_abstract` on a run reads no weights. A full fine-tune restored
into shardings (`restore`, training from a run) goes straight from the checkpoint into them, on
any mesh; the other paths read the run onto one device first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nemo_jax import fp8, lora, model, quant_base, sharding
from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.loading import restore
from nemo_jax.hub import resolve_model
from nemo_jax.quant_base import bnb_kind
from nemo_jax.checkpoint.sources import ParamsSource, np_dtype
from nemo_jax.config import ModelConfig, block_of, target_at
from nemo_jax.errors import UserError


# --- writing and resuming (the trainer) ---------------------------------------------------------------


def checkpoint_manager(run_dir: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict, force=False) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=force)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[dict, dict]:
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              meta=ocp.args.JsonRestore()))
    except ValueError as e:  # orbax: tree structure or shape of the saved state differs from this run's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{mngr.directory}/{step}: this checkpoint does not fit the run being resumed ({first}); "
                        "it was written with other model / LoRA / FP8 / optimizer settings or an older nemo_jax. "
                        "Use a new output_dir (or remove its checkpoints/) to start afresh") from None
    return restored["state"], restored["meta"]


def read_checkpoint_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """A checkpoint's meta (step, data iterator state, resolved config) alone, without its arrays."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_arrays(mngr: ocp.CheckpointManager, step: int, targets: dict) -> dict:
    """Only `targets`' parts of a checkpoint's state (e.g. {"trainable": tree}), each array read
    straight into its ShapeDtypeStruct's sharding and dtype, whatever mesh or process count wrote it;
    the rest (the optimizer's moments, twice the model) is not read at all."""
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape), targets)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=targets, restore_args=restore_args, partial_restore=True)))
    except (ValueError, KeyError) as e:  # orbax: a part or a shape this checkpoint does not have
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{mngr.directory}/{step}: the checkpoint does not hold the {'/'.join(targets)} its "
                        f"run.json describes ({first})") from None
    return restored["state"]


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    tmp.replace(path)


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir}: not a training run directory (no run.json)") from None


# --- reading a run back ----------------------------------------------------------------------------


def read_run(run_dir) -> tuple[ModelConfig, model.LoraSpec | None, fp8.Fp8Spec | None]:
    """(ModelConfig, LoraSpec or None, Fp8Spec or None) of a run, from its run.json alone."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    config = ModelConfig.from_dict(info["model"], source=str(run_dir / "run.json"))
    spec = model.LoraSpec(**{**info["lora"], "targets": tuple(info["lora"]["targets"])}) if info["lora"] else None
    fp8_spec = fp8.Fp8Spec(**{**info["fp8"], "targets": tuple(info["fp8"]["targets"])}) if info.get("fp8") else None
    return config, spec, fp8_spec


def run_checkpoint(run_dir, step=None):
    """(checkpoint manager, step) of a run's newest complete checkpoint, or of `step`."""
    mngr = checkpoint_manager(Path(run_dir), keep=1 << 30, async_save=False)
    step = step if step is not None else mngr.latest_step()
    if step is None:
        raise UserError(f"{run_dir}: the run has no complete checkpoint yet")
    if step not in mngr.all_steps():
        raise UserError(f"{run_dir}: no checkpoint of step {step} (there are {sorted(mngr.all_steps())})")
    return mngr, step


def default_mesh():
    """The first device alone: where a run is read when no mesh is asked for."""
    return sharding.make_mesh(devices=jax.devices()[:1])


def load_run(run_dir, dtype=None, step=None, mesh=None):
    """(ModelConfig, base params, lora params or None, LoraSpec or None) of a run's newest checkpoint
    (or `step`'s), laid out on `mesh` (default: the first device) by the training rules.

    `dtype` sets the model's param dtype (a LoRA run's adapters stay float32, as trained). A LoRA
    run's base is read again from the checkpoint run.json names, or re-initialised from its seed; a
    QLoRA run's targeted kernels are then quantised and dequantised as its steps saw them.
    """
    run_dir = Path(run_dir)
    config, spec, _ = read_run(run_dir)
    mesh = mesh if mesh is not None else default_mesh()
    mngr, step = run_checkpoint(run_dir, step)
    axes, abstract = model.logical_axes(config, spec), model.abstract_variables(config, spec)
    param_sh = sharding.tree_shardings(axes["params"], abstract["params"], mesh)
    out = config.replace(param_dtype=dtype) if dtype is not None else config
    if spec is None:
        target = sharding.with_shardings(_with_dtype(abstract["params"], out.param_dtype), param_sh)
        return out, restore_arrays(mngr, step, {"trainable": target})["trainable"], None, None
    lora_sh = sharding.tree_shardings(axes["lora"], abstract["lora"], mesh)
    target = sharding.with_shardings(_with_dtype(abstract["lora"], jnp.float32), lora_sh)
    lora_params = restore_arrays(mngr, step, {"trainable": target})["trainable"]
    base = read_run_info(run_dir)["base"]
    if base["checkpoint"]:
        _, params = restore(base["checkpoint"], param_sh, dtype=out.param_dtype)
    else:  # as init_arrays made it: the run's own param dtype, then cast
        base_rng, _ = jax.random.split(jax.random.key(base["seed"]))
        params = jax.jit(lambda r: model.init_params(config, r)["params"], out_shardings=param_sh)(base_rng)
        if out.param_dtype != config.param_dtype:
            params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(out.param_dtype), p),
                             out_shardings=param_sh)(params)
    # QLoRA: evaluate and export the base the adapters were trained on (a bitsandbytes checkpoint is read
    # dequantised already: that is the base its run saw)
    if base.get("quantize") and not (base["checkpoint"] and bnb_kind(resolve_model(base["checkpoint"]))):
        quant = quant_base.BaseQuant(**base["quantize"])
        params = jax.jit(lambda p: quant_base.round_trip(p, spec.targets, quant), out_shardings=param_sh)(params)
    return out, params, lora_params, spec


def load_run_fp8(run_dir, step=None, mesh=None) -> tuple[fp8.Fp8Spec | None, dict | None]:
    """(Fp8Spec, FP8 scaling state, replicated on `mesh`) of a QAT run's newest checkpoint (or `step`'s);
    (None, None) for other runs."""
    config, lora_spec, spec = read_run(run_dir)
    if spec is None:
        return None, None
    mngr, step = run_checkpoint(run_dir, step)
    rep = sharding.replicated(mesh if mesh is not None else default_mesh())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          jax.eval_shape(lambda: model.init_fp8(config, spec, lora_spec)[0]))
    return spec, restore_arrays(mngr, step, {"fp8": target})["fp8"]


def load_run_merged(run_dir, dtype=None):
    config, params, lora_params, spec = load_run(run_dir, dtype)
    if spec is not None:
        params = lora.merge(params, lora_params, spec)
    return config, params


def _with_dtype(abstract, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), abstract)


# --- a run as a checkpoint ------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


def run_source(path: Path) -> RunSource | None:
    """A run directory as a Source (registered in orbax_io.PATH_SOURCES by the package), else None."""
    return RunSource(path) if is_run_dir(path) else None


class RunSource(ParamsSource):
    """A run's model: the base with the adapters merged leaf by leaf as each is read, in float32
    before any cast (the weight a QAT run quantised), and an FP8-stored base as the run saw it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config, self.lora, self.fp8_spec = read_run(path)
        run_checkpoint(path)  # a run without a complete checkpoint is an error here, not at the first read
        self.stored_dtype = self.config.param_dtype
        self.base_path = read_run_info(path)["base"]["checkpoint"] if self.lora is not None else None
        what = "LoRA merged" if self.lora else "full fine-tune"
        self.description = f"{path} (training run, {what})"

    @functools.cached_property
    def _arrays(self):
        _, params, lora_params, _ = load_run(self.path)
        return params, lora_params, load_run_fp8(self.path)[1]  # QAT runs: the trained scales (hf-fp8 export)

    params = property(lambda self: self._arrays[0])
    lora_params = property(lambda self: self._arrays[1])
    fp8_state = property(lambda self: self._arrays[2])

    def restore(self, abstract, leaves: list[layout.Leaf] | None = None) -> dict:
        if self.lora is None and not (self.fp8_spec is not None and self.fp8_spec.base_fp8):
            if leaves is not None:  # only those (a QLoRA base is read a leaf at a time): orbax reads no more
                abstract = layout.nest({leaf.path: layout.get_path(abstract, leaf.path) for leaf in leaves})
            return restore_arrays(*run_checkpoint(self.path), {"trainable": abstract})["trainable"]
        return super().restore(abstract, leaves)

    def read_leaf(self, leaf, dtype, layers=None, on_bytes=None, out=None) -> np.ndarray:
        t = target_at(leaf.path)
        merge = self.lora is not None and t in self.lora.targets
        fp8_base = self.fp8_spec is not None and self.fp8_spec.base_fp8 and t in self.fp8_spec.targets
        if not (merge or fp8_base):
            return super().read_leaf(leaf, dtype, layers, on_bytes, out)
        w = jnp.asarray(layout.get_path(self.params, leaf.path), jnp.float32)
        if fp8_base:  # the run trained on the e4m3 base with these scales
            s = fp8.site_state(self.fp8_state, t)["weight_scale"]
            s = s.reshape(s.shape + (1,) * (w.ndim - s.ndim))
            w = fp8.dequantize(fp8.quantize(w, s), s)
        if merge:
            ab = self.lora_params["layers"][block_of(t)][t]
            w = w + lora.delta(ab["a"], ab["b"], self.lora.scale)
        value = np.asarray(w)
        if leaf.stacked and layers is not None:
            value = value[layers]
        value = value.astype(np_dtype(dtype), copy=False)
        if on_bytes:
            on_bytes(value.nbytes)
        if out is None:
            return value
        np.copyto(out, value)
        return out


def export_peft(source, out: Path, opts) -> None:
    """adapter_config.json + adapter_model.safetensors for HF PEFT, from a LoRA training run."""
    if not isinstance(source, RunSource) or source.lora is None:
        raise UserError(f"{source.path}: --format peft needs a LoRA training run directory")
    lora.export_peft(out, source.lora_params, source.lora, source.base_path or str(source.path))
