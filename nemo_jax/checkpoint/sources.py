"""Checkpoints to read from, one stacked leaf at a time.

A `Source` knows its ModelConfig (param_dtype = the stored dtype) and can produce any leaf of the
param tree, or a range of its layers, as a numpy array in our layout. Everything that reads weights
(load, restore into shardings, import, export) goes through this interface, so each of them streams
and each accepts every format.

`SafetensorsSource` reads the two published layouts:

    hf       config.json + model.safetensors, or + model.safetensors.index.json and its shards
    mistral  params.json + consolidated.safetensors

and checks, before any weight is read, that the files hold exactly the tensors the config implies
with the right shapes (the error names the file and the tensor).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.host import Scratch
from nemo_jax.checkpoint.fp8_format import parse_quantization
from nemo_jax.checkpoint.safetensors_io import SafetensorsFile
from nemo_jax.config import DTYPES, ModelConfig, from_hf_config, from_params_json, read_json, target_at
from nemo_jax.errors import UserError

HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
MISTRAL_PARAMS, MISTRAL_FILE = "params.json", "consolidated.safetensors"


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name  # "float32", "bfloat16", "float16", ...


def np_dtype(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))  # knows "bfloat16" through ml_dtypes


def progress_bar(total: int, progress: bool | None, desc: str) -> tqdm:
    """A progress bar over bytes; `progress=None` shows it only when stderr is a terminal."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if progress is None else not progress)


class Source(abc.ABC):
    """Base class: subclasses set the attributes below and implement `read_leaf`."""

    path: Path  # the directory read
    config: ModelConfig  # as the checkpoint describes it; param_dtype = stored_dtype where the model allows
    stored_dtype: str  # "bfloat16", "float32", but also e.g. "float16" or "mixed (...)"
    description: str  # for messages: the path and the format
    format: str  # "nemo_jax", "hf", "mistral"

    @abc.abstractmethod
    def read_leaf(self, leaf: layout.Leaf, dtype: str, layers: slice | None = None,
                  on_bytes: Callable[[int], None] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The leaf (only `layers` of its L axis if given) in our layout as a `dtype` array.

        Written into `out` (which is returned) when given, else into a new array. `on_bytes(n)` is
        called as parts of it are ready (for progress bars)."""

    def abstract(self, dtype: str | None = None):
        """The param tree as ShapeDtypeStructs (no sharding), in `dtype` or the stored one."""
        dt = np_dtype(self.resolve_dtype(dtype))
        return layout.nest({leaf.path: jax.ShapeDtypeStruct(layout.stacked_shape(leaf, self.config), dt)
                            for leaf in layout.LEAVES})

    def resolve_dtype(self, dtype: str | None) -> str:
        """The dtype to load in: the requested one, else the stored one if the model can use it."""
        if dtype is not None:
            if dtype not in DTYPES:
                raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
            return dtype
        if self.stored_dtype not in DTYPES:
            raise UserError(f"{self.description}: weights are stored as {self.stored_dtype}; choose a dtype to "
                            f"convert them to (--dtype {' or '.join(DTYPES)})")
        return self.stored_dtype

    def config_for(self, dtype: str | None) -> ModelConfig:
        """The ModelConfig of the weights as loaded in `dtype`: parameters and compute in `dtype`, for
        every source alike; None keeps the stored param dtype and the source's compute dtype (a run's
        own, float32 for HF / Mistral / orbax checkpoints without one)."""
        config = self.config.replace(param_dtype=self.resolve_dtype(dtype))
        return config.replace(dtype=dtype) if dtype is not None else config

    def restore(self, abstract, leaves: list[layout.Leaf] | None = None) -> dict:
        """The params as jax Arrays laid out as `abstract`'s shardings say (each device's part only).

        Each addressable shard is built from just the layers it covers, so a host reads what its
        devices hold; consecutive devices asking for the same layers share one read. `leaves`
        restores only those (a tree of just them; `abstract` may then hold just them too).
        """
        def make(leaf: layout.Leaf):
            target = layout.get_path(abstract, leaf.path)
            dtype = dtype_name(target.dtype)
            cache: dict = {}

            def shard(index: tuple[slice, ...]) -> np.ndarray:
                layers = index[0] if leaf.stacked else None
                key = None if layers is None else (layers.start, layers.stop, layers.step)
                if key not in cache:
                    cache.clear()
                    cache[key] = self.read_leaf(leaf, dtype, layers)
                # Only the layers were selected so far; select the rest of the index within them.
                return cache[key][(slice(None),) + tuple(index[1:]) if leaf.stacked else tuple(index)]

            # One device at a time, each placed before the next is cut out: the host holds the
            # layers read plus one device's block (make_array_from_callback would cut out every
            # device's block first).
            indices = target.sharding.addressable_devices_indices_map(target.shape)
            shards = [jax.device_put(shard(index), d).block_until_ready() for d, index in indices.items()]
            cache.clear()
            return jax.make_array_from_single_device_arrays(target.shape, target.sharding, shards)

        return layout.nest({leaf.path: make(leaf) for leaf in (layout.LEAVES if leaves is None else leaves)})


class SafetensorsSource(Source):
    """An HF or Mistral safetensors checkpoint directory (see the module docstring)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.format = Path(path), fmt
        self._scratch = Scratch()  # blocks of a layer as stored, and the transposes' temporaries
        self.description = f"{self.path} ({'HF' if fmt == 'hf' else 'Mistral'} safetensors)"
        self.fp8 = None  # an FP8 checkpoint's layout (fp8_format.Fp8Format): dequantised on read
        if fmt == "hf":
            raw = read_json(self.path / HF_CONFIG)
            config = from_hf_config(raw, source=str(self.path / HF_CONFIG))
            if "quantization_config" in raw:
                self.fp8 = parse_quantization(raw["quantization_config"], config, str(self.path / HF_CONFIG))
            files = self._hf_files()
        else:
            config = from_params_json(read_json(self.path / MISTRAL_PARAMS), source=str(self.path / MISTRAL_PARAMS))
            files = {None: self.path / MISTRAL_FILE}
        self.files: dict[str, SafetensorsFile] = {}  # tensor name -> its file
        opened = {p: SafetensorsFile(p) for p in sorted(set(files.values()))}
        for f in opened.values():
            for name in f.entries:
                if name in self.files:
                    raise UserError(f"{f.path}: tensor {name!r} also appears in {self.files[name].path}")
                self.files[name] = f
        for name, p in files.items():  # the index must agree with the shards' own headers
            if name is not None and name not in opened[p].entries:
                raise UserError(f"{p}: missing tensor {name!r} (listed in {HF_INDEX})")
        config_file = HF_CONFIG if fmt == "hf" else MISTRAL_PARAMS
        expected = {}
        for leaf, i, name in layout.tensor_names(fmt, config):
            expected[name] = leaf
            for extra in self._fp8_tensors(leaf, name):
                expected[extra] = leaf
                if extra not in self.files:
                    raise UserError(f"{self.path}: missing tensor {extra!r} (an FP8 checkpoint needs it)")
            if name not in self.files:
                where = self.path / HF_INDEX if (fmt == "hf" and None not in files) else next(iter(opened))
                raise UserError(f"{where}: missing tensor {name!r}")
            shape = self.files[name].entries[name].shape
            if shape != layout.source_shape(leaf, config):
                raise UserError(f"{self.files[name].path}: tensor {name!r} has shape {list(shape)}, but "
                                f"{config_file} implies {list(layout.source_shape(leaf, config))}")
        for name, f in self.files.items():
            if name not in expected:
                raise UserError(f"{f.path}: unexpected tensor {name!r} (not part of a {fmt} checkpoint "
                                f"of the model {config_file} describes)")
        stored = {dtype_name(f.entries[n].dtype) for n, f in self.files.items()
                  if not (self.fp8 and (n.endswith("_scale") or f.entries[n].dtype.itemsize == 1))}
        self.stored_dtype = stored.pop() if len(stored) == 1 else "mixed (" + ", ".join(sorted(stored)) + ")"
        self.config = config.replace(param_dtype=self.stored_dtype) if self.stored_dtype in DTYPES else config

    def _fp8_tensors(self, leaf: layout.Leaf, name: str) -> list[str]:
        """The scale tensors an FP8 checkpoint stores beside a quantised weight."""
        if self.fp8 is None or target_at(leaf.path) not in self.fp8.targets:
            return []
        prefix = name[: -len(".weight")]
        return [prefix + ".weight_scale"] + ([prefix + ".input_scale"] if self.fp8.static_inputs else [])

    def _hf_files(self) -> dict[str | None, Path]:
        index, single = self.path / HF_INDEX, self.path / HF_SINGLE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: no weight_map")
            for name, file in weight_map.items():
                if not isinstance(file, str) or "/" in file or not (self.path / file).is_file():
                    raise UserError(f"{self.path / str(file)}: file not found (listed for tensor {name!r} in {index})")
            return {name: self.path / file for name, file in weight_map.items()}
        if single.exists():
            return {None: single}
        raise UserError(f"{self.path}: no {HF_SINGLE} or {HF_INDEX} (only safetensors checkpoints are supported)")

    def read_leaf(self, leaf, dtype, layers=None, on_bytes=None, out=None) -> np.ndarray:
        dt, c = np_dtype(dtype), self.config
        on_bytes = on_bytes or (lambda n: None)
        idx = range(c.n_layers)[layers] if layers is not None else range(c.n_layers)
        shape = ((len(idx),) if leaf.stacked else ()) + layout.leaf_shape(leaf, c)
        if out is None:
            out = np.empty(shape, dt)
        assert out.shape == shape and out.dtype == dt, (out.shape, out.dtype, shape, dt)
        if not leaf.stacked:
            self._read_into(leaf, None, out)
            on_bytes(out.nbytes)
            return out
        for j, i in enumerate(idx):
            self._read_into(leaf, i, out[j])
            on_bytes(out[j].nbytes)
        return out

    def _read_into(self, leaf: layout.Leaf, layer: int | None, out: np.ndarray) -> None:
        name = leaf.name(self.format, layer)
        f = self.files[name]
        e = f.entries[name]
        if leaf.n_in == 0 and e.dtype == out.dtype:
            f.read(name, out=out)  # straight into place, no temporary
            return

        def read_rows(r0: int, r1: int) -> np.ndarray:
            return f.read(name, out=self._scratch.get((r1 - r0,) + e.shape[1:], e.dtype, "read"), rows=(r0, r1))

        if self._fp8_tensors(leaf, name):  # e4m3 x per-tensor scale, as compressed-tensors/vLLM dequantise
            scale_name = name[: -len(".weight")] + ".weight_scale"
            scale = self.files[scale_name].read(scale_name).astype(np.float32)
            if scale.size != 1:
                raise UserError(f"{self.files[scale_name].path}: {scale_name} has {scale.size} values; only "
                                "per-tensor FP8 scales are supported")
            raw_rows = read_rows

            def read_rows(r0: int, r1: int) -> np.ndarray:
                return raw_rows(r0, r1).astype(np.float32) * scale.reshape(())

        layout.to_ours(leaf, self.format, read_rows, self.config, out, self._scratch)


class ParamsSource(Source):
    """A param tree already in memory as a Source (e.g. a training run's weights, LoRA merged), so
    that everything which reads checkpoints (load, restore, import, export) accepts it too."""

    format = "nemo_jax"

    def __init__(self, config: ModelConfig, params: dict, path: Path, description: str | None = None):
        self.config, self.params, self.path = config, params, Path(path)
        self.stored_dtype = config.param_dtype
        self.description = description or f"{self.path} (in memory)"

    def read_leaf(self, leaf, dtype, layers=None, on_bytes=None, out=None) -> np.ndarray:
        value = np.asarray(layout.get_path(self.params, leaf.path))  # gathers a sharded array to this host
        if leaf.stacked and layers is not None:
            value = value[layers]
        value = value.astype(np_dtype(dtype), copy=False)
        if on_bytes:
            on_bytes(value.nbytes)
        if out is None:
            return value
        np.copyto(out, value)
        return out
