"""The front door: one way to open, load and restore any checkpoint a user can name.

`open_checkpoint` detects the layout (nemo_jax orbax, HF or Mistral safetensors, a training run) of a
path or Hub id and gives its `Source`; `load_abstract`, `restore` and `load` read through it. The
package's __init__ re-exports these; the other submodules import them from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax

from nemo_jax.checkpoint.layout import LEAVES, nest, stacked_shape
from nemo_jax.checkpoint.orbax_io import is_checkpoint, resolve_checkpoint
from nemo_jax.checkpoint.safetensors_io import tensor_readers
from nemo_jax.checkpoint.sources import (HF_CONFIG, HF_INDEX, HF_SINGLE, MISTRAL_FILE, MISTRAL_PARAMS,
                                         ParamsSource, SafetensorsSource, Source)
from nemo_jax.config import ModelConfig, from_hf_config
from nemo_jax.quant_base import bnb_kind, read_bnb_checkpoint
from nemo_jax.errors import UserError
from nemo_jax.hub import resolve_model

FORMATS = ("nemo_jax", "hf", "mistral")


def detect_format(path: Path) -> str:
    """"nemo_jax", "hf" or "mistral", from the files in `path`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (a checkpoint is a directory)")
    if is_checkpoint(path):
        return "nemo_jax"
    if (path / MISTRAL_PARAMS).is_file():
        if not (path / MISTRAL_FILE).is_file():
            raise UserError(f"{path / MISTRAL_FILE}: file not found (Mistral checkpoints need {MISTRAL_PARAMS} and "
                            f"{MISTRAL_FILE}; consolidated .pth files are not supported)")
        return "mistral"
    if (path / HF_CONFIG).is_file():
        if not ((path / HF_SINGLE).is_file() or (path / HF_INDEX).is_file()):
            raise UserError(f"{path}: has {HF_CONFIG} but no {HF_SINGLE} or {HF_INDEX} "
                            f"(only safetensors checkpoints are supported)")
        return "hf"
    return "nemo_jax"  # resolve_checkpoint decides (e.g. a training run), or says it is not a checkpoint


def open_checkpoint(path: Path, fmt: str | None = None) -> Source:
    """A Source for `path`, detecting the format unless `fmt` says it."""
    path = resolve_model(path)  # a Hub id -> its downloaded snapshot (nemo_jax/hub.py); local paths as given
    fmt = fmt or detect_format(path)
    if fmt == "nemo_jax":
        return resolve_checkpoint(path)
    if fmt in ("hf", "mistral"):
        if not Path(path).is_dir():
            raise UserError(f"{path}: not found or not a directory")
        if fmt == "hf" and bnb_kind(path):
            return _bnb_source(Path(path))
        return SafetensorsSource(Path(path), fmt)
    raise UserError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


Shardings = Callable[[dict], dict] | dict | jax.sharding.Sharding | None


def load_abstract(path: Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the param tree as ShapeDtypeStructs, reading only headers/metadata."""
    source = open_checkpoint(path)
    return source.config_for(dtype), source.abstract(dtype)


def restore(path: Path, shardings: Shardings = None, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) with each array placed as `shardings` says.

    `shardings`: a function from the abstract param tree to a tree of `jax.sharding.Sharding`, such
    a tree itself, one Sharding for every leaf, or None for the default device. `dtype` (float32 or
    bfloat16) casts the weights; None keeps the stored dtype. The config's param_dtype is the dtype
    of the returned params.
    """
    source = open_checkpoint(path)
    abstract = source.abstract(dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        shardings = shardings(abstract)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    try:
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    except ValueError as e:
        raise ValueError(f"shardings do not match the param tree: {e}") from None
    return source.config_for(dtype), source.restore(targets)


def load_config(path) -> ModelConfig:
    """The architecture of any checkpoint a user can name, from metadata alone: a Hub id's config.json
    (or the built-in NeMo architecture), a bitsandbytes 4-/8-bit HF directory's config.json (its weights
    are no plain checkpoint), else the checkpoint's own metadata."""
    from nemo_jax.hub import model_config

    return model_config(path) or _bnb_config(path) or load_abstract(path)[0]


def _bnb_config(path) -> ModelConfig | None:
    if not (Path(path).is_dir() and bnb_kind(path)):
        return None
    return from_hf_config(json.loads((Path(path) / HF_CONFIG).read_text()))


def _bnb_source(path: Path) -> ParamsSource:
    """An HF directory bitsandbytes quantised (4- or 8-bit) as the float32 model it computes with: every
    quantised kernel dequantised as bitsandbytes does."""
    config = from_hf_config(json.loads((path / HF_CONFIG).read_text())).replace(param_dtype="float32")
    shapes = {leaf.path: stacked_shape(leaf, config) for leaf in LEAVES}
    host = read_bnb_checkpoint(path, tensor_readers(path), LEAVES, shapes)
    return ParamsSource(config, nest(host), path, f"{path} (bitsandbytes {bnb_kind(path)}, dequantized)")


def load(path: Path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a nemo_jax, HF or Mistral checkpoint directory; params on one device."""
    return restore(path, None, dtype)
