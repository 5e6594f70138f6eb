"""Training run directories as checkpoints: `load`, `restore` and `export` accept them too.

A run's newest checkpoint holds either the whole model (full fine-tuning) or only LoRA adapters
plus a reference to the base (run.json). `RunSource` serves the model weights with the adapters
merged, and keeps the adapters themselves for `export --format peft`.

Only parameters are read (never the optimizer state), and only when first needed: the config and
the tree's shapes come from run.json, so `load_abstract` on a run reads no weights. A full
fine-tune restored into shardings (`restore`, training from a run) goes straight from the
checkpoint into them, on any mesh; the other paths read the run onto one device first.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.sources import ParamsSource, np_dtype
from nemo_jax.errors import UserError


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


class RunSource(ParamsSource):
    """A run's model: the base with the adapters merged leaf by leaf as each is read, in float32
    before any cast (the weight a QAT run quantised), and an FP8-stored base as the run saw it."""

    def __init__(self, path: Path):
        from nemo_jax.train_loop import read_run_info
        from nemo_jax.trainer import read_run, run_checkpoint

        self.path = Path(path)
        self.config, self.lora, self.fp8_spec = read_run(path)
        run_checkpoint(path)  # a run without a complete checkpoint is an error here, not at the first read
        self.stored_dtype = self.config.param_dtype
        self.base_path = read_run_info(path)["base"]["checkpoint"] if self.lora is not None else None
        what = "LoRA merged" if self.lora else "full fine-tune"
        self.description = f"{path} (training run, {what})"

    @functools.cached_property
    def _arrays(self):
        from nemo_jax.trainer import load_run, load_run_fp8

        _, params, lora_params, _ = load_run(self.path)
        return params, lora_params, load_run_fp8(self.path)[1]  # QAT runs: the trained scales (hf-fp8 export)

    params = property(lambda self: self._arrays[0])
    lora_params = property(lambda self: self._arrays[1])
    fp8_state = property(lambda self: self._arrays[2])

    def restore(self, abstract) -> dict:
        if self.lora is None and not (self.fp8_spec is not None and self.fp8_spec.base_fp8):
            from nemo_jax.train_loop import restore_arrays
            from nemo_jax.trainer import run_checkpoint

            return restore_arrays(*run_checkpoint(self.path), {"trainable": abstract})["trainable"]
        return super().restore(abstract)

    def read_leaf(self, leaf, dtype, layers=None, on_bytes=None, out=None) -> np.ndarray:
        import jax.numpy as jnp

        from nemo_jax import fp8 as F8
        from nemo_jax import lora as lora_lib
        from nemo_jax.checkpoint.fp8_io import target_of

        t = target_of(leaf)
        merge = self.lora is not None and t in self.lora.targets
        fp8_base = self.fp8_spec is not None and self.fp8_spec.base_fp8 and t in self.fp8_spec.targets
        if not (merge or fp8_base):
            return super().read_leaf(leaf, dtype, layers, on_bytes, out)
        w = jnp.asarray(layout.get_path(self.params, leaf.path), jnp.float32)
        if fp8_base:  # the run trained on the e4m3 base with these scales
            s = F8.site_state(self.fp8_state, t)["weight_scale"]
            s = s.reshape(s.shape + (1,) * (w.ndim - s.ndim))
            w = F8.dequantize(F8.quantize(w, s), s)
        if merge:
            sub = "attention" if t in ("q", "k", "v", "o") else "mlp"
            ab = self.lora_params["layers"][sub][t]
            w = w + lora_lib._delta(ab["a"], ab["b"], self.lora.scale)
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
    from nemo_jax import lora as lora_lib

    if not isinstance(source, RunSource) or source.lora is None:
        raise UserError(f"{source.path}: --format peft needs a LoRA training run directory")
    lora_lib.export_peft(out, source.lora_params, source.lora, source.base_path or str(source.path))
