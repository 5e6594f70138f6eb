"""Export a checkpoint to the published safetensors layouts, one stacked leaf in memory at a time.

Each format is one function `(source, out_dir, options) -> None` in `EXPORTERS`, writing into an
empty directory; `export_checkpoint` wraps it in the overwrite check and the temporary-directory
rename. New formats (PEFT adapters, FP8 HF checkpoints) are new entries.

Tensors are written grouped by leaf (every layer's q_proj, then every k_proj, ...), not layer by
layer as transformers writes them: loaders go through the index by name, so the order inside a
file is free, and this order reads each stacked leaf once. The safetensors headers are computed
up front from the config, so each tensor goes to disk as soon as it is produced.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable


from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.host import Scratch
from nemo_jax.checkpoint.safetensors_io import Writer
from nemo_jax.checkpoint.sources import (HF_CONFIG, HF_INDEX, MISTRAL_FILE, MISTRAL_PARAMS, Source, np_dtype,
                                         progress_bar)
from nemo_jax.checkpoint.staging import staged_output
from nemo_jax.config import ModelConfig, to_hf_config, to_params_json
from nemo_jax.errors import UserError

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' "5GB"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    dtype: str | None = None  # None: the stored dtype
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE  # bytes per HF shard (a larger single tensor gets its own)
    progress: bool | None = False
    # hf-fp8 from a checkpoint trained without FP8: where its static input scales come from
    calibration: tuple[str, ...] = ()  # data files (jsonl), as eval.py reads them
    calibration_batches: int = 8
    calibration_batch_size: int = 4
    calibration_seq_len: int = 512
    tokenizer: str | None = None
    # (source, config, Fp8Spec, options) -> FP8 state with the input scales: a forward over the data,
    # which the layers above provide (nemo_jax.calibration.calibrate; the CLI passes it)
    calibrate: Callable | None = None
    gguf_type: str = "bf16"  # --format gguf: bf16, f16 or q8_0 (gguf_export.py)


Exporter = Callable[[Source, Path, ExportOptions], None]
Tensor = tuple[layout.Leaf, int | None, str]  # (leaf, layer, name in the output format)


def export_hf(source: Source, out: Path, opts: ExportOptions) -> None:
    """HF transformers layout: config.json, model-0000k-of-0000n.safetensors, their index."""
    config = source.config_for(opts.dtype)
    itemsize = np_dtype(config.param_dtype).itemsize
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in layout.tensor_names("hf", config):
        nbytes = math.prod(layout.source_shape(t[0], config)) * itemsize
        if shards[-1] and size + nbytes > opts.max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = _write_safetensors(source, config, "hf", [(out / f, s) for f, s in zip(files, shards)], opts.progress)
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted((name, f) for f, s in zip(files, shards) for _, _, name in s))}
    (out / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / HF_CONFIG).write_text(json.dumps(to_hf_config(config, config.param_dtype), indent=2) + "\n")


def export_mistral(source: Source, out: Path, opts: ExportOptions) -> None:
    """Mistral consolidated layout: params.json and one consolidated.safetensors."""
    config = source.config_for(opts.dtype)
    _write_safetensors(source, config, "mistral", [(out / MISTRAL_FILE, layout.tensor_names("mistral", config))],
                       opts.progress)
    (out / MISTRAL_PARAMS).write_text(json.dumps(to_params_json(config), indent=2) + "\n")


def _export_peft(source: Source, out: Path, opts: ExportOptions) -> None:
    from nemo_jax.checkpoint.runs import export_peft

    export_peft(source, out, opts)


def _export_hf_fp8(source: Source, out: Path, opts: ExportOptions) -> None:
    from nemo_jax.checkpoint.fp8_io import export_hf_fp8

    export_hf_fp8(source, out, opts)


def _export_gguf(source: Source, out: Path, opts: ExportOptions) -> None:
    from nemo_jax.checkpoint.gguf_export import export_gguf

    export_gguf(source, out, opts)


EXPORTERS: dict[str, Exporter] = {"hf": export_hf, "mistral": export_mistral, "peft": _export_peft,
                                  "hf-fp8": _export_hf_fp8, "gguf": _export_gguf}


def export_checkpoint(source: Source, out: Path, fmt: str, opts: ExportOptions = ExportOptions(),
                      force: bool = False) -> None:
    if fmt not in EXPORTERS:
        raise UserError(f"--format: expected one of {', '.join(EXPORTERS)}, got {fmt!r}")
    with staged_output(Path(out), force, protect=(source.path,)) as tmp:
        EXPORTERS[fmt](source, tmp, opts)


def _write_safetensors(source: Source, config: ModelConfig, fmt: str, files: list[tuple[Path, list[Tensor]]],
                       progress: bool | None) -> int:
    """Write `files` (consecutive runs of the leaf-ordered tensor list); returns the tensor bytes."""
    dt = np_dtype(config.param_dtype)
    total = sum(math.prod(layout.source_shape(leaf, config)) * dt.itemsize for _, ts in files for leaf, _, _ in ts)
    current, value, x, scratch = None, None, None, Scratch()
    # Sources that read straight into a buffer get the same one for every leaf: re-touching warm
    # pages is much cheaper than faulting in fresh ones (see host.Scratch).
    leaf_buffer = Scratch() if getattr(source, "reads_into_out", False) else None
    with progress_bar(total, progress, "export") as bar:
        for path, tensors in files:
            entries = [(name, dt, layout.source_shape(leaf, config)) for leaf, _, name in tensors]
            # A background thread writes the file while the next blocks are converted and the next leaf read.
            with Writer(path, entries, metadata={"format": "pt"}, background=True) as w:
                for leaf, i, name in tensors:
                    if leaf is not current:
                        if current is not None and current.n_in == 0:
                            w.drain()  # its tensors were queued as views of `value`: written before it is reused
                        current, value, x = leaf, None, None  # drop the previous leaf before reading the next
                        bar.set_postfix_str(leaf.key())
                        out = leaf_buffer and leaf_buffer.get(layout.stacked_shape(leaf, config), dt)
                        value = source.read_leaf(leaf, config.param_dtype, out=out)
                    x = value[i] if leaf.stacked else value
                    w.write(name, layout.from_ours(leaf, fmt, x, config, scratch, w.block))
                    bar.update(x.nbytes)
    return total


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size); '500MiB', '123' work too."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (KeyError, ValueError):
        raise UserError(f"--max-shard-size: expected a size like 5GB or 500MB, got {text!r}") from None
    if value < 1:
        raise UserError(f"--max-shard-size: must be positive, got {text!r}")
    return int(value)

