"""Checkpoints: load any supported layout, convert between them, restore straight into shardings.

Three layouts are read, detected from the files:

    nemo_jax   CKPT/config.json ({"format": "nemo_jax", ...}) + CKPT/params/ (orbax; see orbax_io.py)
    hf         config.json + model.safetensors or model.safetensors.index.json + shards
    mistral    params.json + consolidated.safetensors (wq/wk rows in interleaved-rope order)

and all give the same param tree (model.py's docstring; name tables in layout.py):

    config, params = load(path)                       # plain dict of jax arrays on the default device
    config, abstract = load_abstract(path)            # ShapeDtypeStructs, to compute shardings from
    config, params = restore(path, shardings)         # each device reads only its part

Everything streams: a conversion holds one stacked tensor (plus one layer) in memory, never the
model (sources.py reads leaf by leaf, export.py writes tensor by tensor).

Extension points: `PATH_SOURCES` (orbax_io.py) maps a path that is neither an HF/Mistral directory
nor an orbax checkpoint to a `Source`; this package registers training run directories there
(runs.py), so they are loadable and exportable (`ParamsSource` wraps weights already in memory).
`EXPORTERS` (export.py) maps `--format` names to writer functions.

The functions live in submodules (loading.py: the front door above; runs.py: run directories), which
import each other, never this file.
"""

from nemo_jax.checkpoint import orbax_io, runs
from nemo_jax.checkpoint.export import EXPORTERS, ExportOptions, export_checkpoint
from nemo_jax.checkpoint.loading import (FORMATS, detect_format, load, load_abstract, load_config, open_checkpoint,
                                         restore)
from nemo_jax.checkpoint.orbax_io import OrbaxSource, StreamingWriter, import_checkpoint, resolve_checkpoint, save_orbax
from nemo_jax.checkpoint.sources import ParamsSource, SafetensorsSource, Source

__all__ = ["load", "load_abstract", "load_config", "restore", "save_orbax", "open_checkpoint", "detect_format",
           "resolve_checkpoint", "import_checkpoint", "export_checkpoint", "ExportOptions", "EXPORTERS",
           "Source", "OrbaxSource", "SafetensorsSource", "ParamsSource", "StreamingWriter", "FORMATS"]

# A run directory's newest checkpoint is a checkpoint too (runs.py reads runs; it opens their base
# checkpoints through loading.py, so it cannot be imported by orbax_io: it is registered here).
if runs.run_source not in orbax_io.PATH_SOURCES:
    orbax_io.PATH_SOURCES.append(runs.run_source)
