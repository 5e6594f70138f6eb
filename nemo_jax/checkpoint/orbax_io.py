"""nemo_jax's own model checkpoint: the param tree in orbax, the ModelConfig beside it.

    CKPT/config.json   {"format": "nemo_jax", "version": 1, "model": ModelConfig.to_dict()}
    CKPT/params/       an orbax PyTree checkpoint (orbax.checkpoint.v1) of the plain param dict
                       {"embed": {"embedding": [V, D]}, "layers": {...}, ...} exactly as model.py
                       lays it out, stored uncompressed (bf16/fp32 weights barely compress, and zstd
                       would make conversion CPU-bound)

Anything orbax can read opens `params/` on its own, e.g. `orbax.checkpoint.v1.load(CKPT/params,
abstract_tree)` with abstract arrays carrying shardings, so each device reads only its part.
`model.param_dtype` matches the stored arrays.

Import writes the leaves one at a time with orbax's partial save (at most two stacked tensors in
memory: one being saved, the next being read) and finalizes once at the end; `save_orbax` writes a tree that is already in memory (and may
be sharded) in one go. Both produce the same layout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp

from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.safetensors_io import read_into
from nemo_jax.checkpoint.sources import Source, dtype_name, np_dtype, progress_bar
from nemo_jax.checkpoint.staging import staged_output, start_writeback_tree
from nemo_jax.config import DTYPES, ModelConfig, read_json
from nemo_jax.errors import UserError

FORMAT, VERSION = "nemo_jax", 1
CONFIG_FILE, PARAMS_DIR = "config.json", "params"


@contextlib.contextmanager
def _no_fsync_per_file():
    """Let tensorstore skip its fsync after every file it writes (3x faster writes measured here).

    Durability is not lost: `staged_output` fsyncs the whole directory once before the rename that
    makes it a checkpoint. orbax has no option for this, so it patches orbax's private default
    tensorstore context; if that ever moves, writes are merely slower.
    """
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
        names = [n for n in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT")
                 if isinstance(getattr(ts_utils, n, None), dict)]
    except ImportError:
        ts_utils, names = None, []
    saved = {n: getattr(ts_utils, n) for n in names}
    for n in names:
        setattr(ts_utils, n, {**saved[n], "file_io_sync": False})
    try:
        yield
    finally:
        for n in names:
            setattr(ts_utils, n, saved[n])


def _context(partial_load: bool = False):
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    # One chunk per leaf, however large. orbax's default (a 2 GiB OCDBT data-file target) splits a
    # larger leaf, such as 12B's 5.9 GB MLP stacks, into chunks, and then tensorstore copies the
    # whole leaf into encoded chunks before writing (measured: +1.0x the leaf; one chunk: +0.03x,
    # written from our buffer), and the reader cannot take the raw-bytes path (`_raw_locations`),
    # so export fell back to orbax's read, which holds the leaf twice.
    ctx.array.saving.ocdbt_target_data_file_size = 0
    ctx.memory.deepcopy_host_arrays = False  # saves are synchronous: nothing modifies the arrays meanwhile
    ctx.pytree.loading.partial_load = partial_load
    return ctx


def is_checkpoint(path: Path) -> bool:
    """True for a directory with our config.json (complete or not: the reader says what is wrong)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


# Functions from a path to its Source, or None when it is not theirs: the kinds of nemo_jax path
# other than a model checkpoint. The package registers training run directories (runs.run_source).
PATH_SOURCES: list[Callable[[Path], Source | None]] = []


def resolve_checkpoint(path: Path) -> Source:
    """The weights a nemo_jax path names, as a Source (what load, restore and export read).

    The one place that maps a user's path that is not an HF/Mistral directory to weights: a model
    checkpoint directory, or what a PATH_SOURCES entry makes of it (a run directory gives its newest
    checkpoint: a `ParamsSource` over its weights with LoRA merged).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found")
    if is_checkpoint(path):
        return OrbaxSource(path)
    for make in PATH_SOURCES:
        source = make(path)
        if source is not None:
            return source
    raise UserError(f"{path}: not a checkpoint (expected a nemo_jax checkpoint with {CONFIG_FILE} and "
                    f"{PARAMS_DIR}/, an HF directory with config.json and model.safetensors[.index.json], "
                    f"a Mistral directory with params.json and consolidated.safetensors, or a training run directory with run.json)")


def write_config(out: Path, config: ModelConfig) -> None:
    meta = {"format": FORMAT, "version": VERSION, "model": config.to_dict()}
    (Path(out) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_orbax(out_dir: Path, config: ModelConfig, params: dict, force: bool = False) -> None:
    """Save an in-memory (possibly sharded) param tree as a nemo_jax checkpoint at `out_dir`.

    Written to a temporary directory and renamed at the end (see staging.py); single-process only.
    """
    leaves = jax.tree.leaves(params)
    dtypes = {dtype_name(x.dtype) for x in leaves}
    if dtypes != {config.param_dtype}:
        raise ValueError(f"params are {sorted(dtypes)} but config.param_dtype is {config.param_dtype}")
    with staged_output(Path(out_dir), force) as tmp:
        with _context(), _no_fsync_per_file():
            ocp.save(tmp / PARAMS_DIR, params)
        write_config(tmp, config)


class StreamingWriter:
    """Writes a checkpoint leaf by leaf into `out` (an empty directory), holding one leaf at a time."""

    def __init__(self, out: Path, config: ModelConfig):
        self.out, self.config = Path(out), config

    def add(self, leaf: layout.Leaf, value: np.ndarray) -> None:
        """Returns once the leaf is written, so the caller may reuse `value`'s memory."""
        with _context(), _no_fsync_per_file():
            ocp.partial.save(self.out / PARAMS_DIR, layout.nest({leaf.path: value}))

    def finish(self) -> None:
        with _context(), _no_fsync_per_file():
            ocp.partial.finalize(self.out / PARAMS_DIR)
        write_config(self.out, self.config)


def import_checkpoint(source: Source, out: Path, dtype: str | None = None, force: bool = False,
                      progress: bool | None = False) -> ModelConfig:
    """Convert any source to a nemo_jax checkpoint at `out`, at most two stacked leaves in memory.

    A background thread saves leaf k while the main thread reads (and transposes) leaf k+1: on a
    VM the saves mostly wait on fresh page-cache pages, so the two overlap well. Both live in one
    buffer, allocated once (re-touching warm pages is much cheaper than faulting in fresh ones), as
    large as the largest leaf plus the largest smaller one (12B: 5.9 + 1.7 GB, 0.31x the model);
    the leaves are ordered so that consecutive ones fit in it together (largest, then the largest
    that fits beside it, ...), and where two do not, the read waits.
    """
    config = source.config_for(dtype)
    dt = np_dtype(config.param_dtype)
    size = {leaf: math.prod(layout.stacked_shape(leaf, config)) * dt.itemsize for leaf in layout.LEAVES}
    by_size = sorted(set(size.values()), reverse=True)
    cap = by_size[0] + (by_size[1] if len(by_size) > 1 else by_size[0])
    order, left = [], sorted(layout.LEAVES, key=lambda l: -size[l])
    while left:
        prev = size[order[-1]] if order else 0
        pick = next((l for l in left if prev + size[l] <= cap), left[0])
        order.append(pick)
        left.remove(pick)
    buffer = np.empty(cap, np.uint8)
    total = sum(size.values())
    with staged_output(Path(out), force, protect=(source.path,)) as tmp, \
            progress_bar(total, progress, "import") as bar, \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orbax save") as pool:
        writer, flushed = StreamingWriter(tmp, config), set()

        def save(leaf, value):
            writer.add(leaf, value)
            start_writeback_tree(tmp, flushed)  # the final fsync then has little left to write

        pending, held = None, (0, 0)  # the save in flight and the bytes [a, b) of `buffer` it reads
        try:
            for leaf in order:
                bar.set_postfix_str(leaf.key())
                n = size[leaf]
                if n <= held[0]:
                    at = 0
                elif cap - n >= held[1]:
                    at = cap - n
                else:  # does not fit beside the leaf being saved: wait for it
                    pending.result()
                    pending, held, at = None, (0, 0), 0
                value = buffer[at:at + n].view(dt).reshape(layout.stacked_shape(leaf, config))
                source.read_leaf(leaf, config.param_dtype, on_bytes=bar.update, out=value)
                if pending is not None:
                    pending.result()  # raises the save's error here
                pending, held = pool.submit(save, leaf, value), (at, at + n)
            pending.result()
        except BaseException:
            if pending is not None:
                pending.cancel()
                concurrent.futures.wait([pending])  # the save must be over before the directory goes
            raise
        writer.finish()
    return config


class OrbaxSource(Source):
    format = "nemo_jax"
    reads_into_out = True  # read_leaf(out=buffer) fills the buffer without a temporary copy

    def __init__(self, path: Path):
        self.path = Path(path)
        self.description = f"{self.path} (nemo_jax checkpoint)"
        meta = read_json(self.path / CONFIG_FILE)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION or not isinstance(meta.get("model"), dict):
            raise UserError(f"{self.path / CONFIG_FILE}: expected format {FORMAT!r} version {VERSION} "
                            f"with a 'model' section")
        config = ModelConfig.from_dict(meta["model"], source=str(self.path / CONFIG_FILE))
        params = self.path / PARAMS_DIR
        if not params.is_dir() or not ocp.is_orbax_checkpoint(params):
            raise UserError(f"{params}: missing or incomplete orbax checkpoint")
        stored = ocp.metadata(params).metadata
        dtypes = set()
        for leaf in layout.LEAVES:
            try:
                m = layout.get_path(stored, leaf.path)
            except (KeyError, TypeError):
                raise UserError(f"{params}: missing tensor {leaf.key()!r}") from None
            if tuple(m.shape) != layout.stacked_shape(leaf, config):
                raise UserError(f"{params}: tensor {leaf.key()!r} has shape {list(m.shape)}, but "
                                f"{self.path / CONFIG_FILE} implies {list(layout.stacked_shape(leaf, config))}")
            dtypes.add(dtype_name(m.dtype))
        extra = set(_flat_keys(stored)) - {leaf.key() for leaf in layout.LEAVES}
        if extra:
            raise UserError(f"{params}: unexpected tensor {sorted(extra)[0]!r}")
        self.stored_dtype = dtypes.pop() if len(dtypes) == 1 else "mixed (" + ", ".join(sorted(dtypes)) + ")"
        self.config = config.replace(param_dtype=self.stored_dtype) if self.stored_dtype in DTYPES else config

    def read_leaf(self, leaf, dtype, layers=None, on_bytes=None, out=None) -> np.ndarray:
        raw = self._raw_location(leaf)
        if raw is not None and (layers is None or layers.step in (None, 1)):
            value = self._read_raw(leaf, raw, dtype, layers, out)
        else:
            target = np.empty(layout.stacked_shape(leaf, self.config), np_dtype(dtype))  # placeholder: no data touched
            with _context(partial_load=True):
                value = layout.get_path(ocp.load(self.path / PARAMS_DIR, layout.nest({leaf.path: target})), leaf.path)
            if leaf.stacked and layers is not None:
                value = value[layers]
        if on_bytes:
            on_bytes(value.nbytes)
        if out is None or value is out:
            return value
        np.copyto(out, value)
        return out

    def _raw_location(self, leaf: layout.Leaf) -> "_Raw | None":
        if not hasattr(self, "_raw"):
            self._raw = _raw_locations(self.path / PARAMS_DIR)
        raw = self._raw.get(leaf.path) if self._raw else None
        return raw if raw is not None and raw.shape == layout.stacked_shape(leaf, self.config) else None

    def _read_raw(self, leaf, raw: "_Raw", dtype, layers, out) -> np.ndarray:
        """The leaf's bytes straight from the file orbax wrote them to: no second copy in memory."""
        shape = raw.shape
        offset = raw.offset
        if leaf.stacked and layers is not None:
            start, stop, _ = layers.indices(shape[0])
            row = raw.nbytes // shape[0] if shape[0] else 0
            shape, offset = (max(0, stop - start),) + shape[1:], offset + start * row
        dt = np_dtype(dtype)
        target = out if (out is not None and out.dtype == raw.dtype and out.flags.c_contiguous) else None
        value = np.empty(shape, raw.dtype) if target is None else target
        assert value.shape == shape, (value.shape, shape)
        if raw.inline is not None:
            value.reshape(-1).view(np.uint8)[...] = np.frombuffer(raw.inline, np.uint8)[offset:offset + value.nbytes]
        elif not read_into(raw.file, offset, value):
            raise UserError(f"{raw.file}: truncated (tensor {leaf.key()!r})")
        return value if value.dtype == dt else value.astype(dt)

    def restore(self, abstract, leaves: list[layout.Leaf] | None = None) -> dict:
        """Each device's part straight from the bytes orbax wrote (see `_raw_locations`), else
        through orbax.

        A leaf is one chunk however large (see `_context`), and tensorstore decodes a whole chunk
        for every slice of it it is asked for: under fsdp=8 each of 8 devices would read the whole
        leaf, concurrently. The raw path maps the file and copies out only the device's block.
        """
        leaves = layout.LEAVES if leaves is None else leaves
        raw = {leaf.path: self._raw_location(leaf) for leaf in leaves}
        if all(r is not None for r in raw.values()):
            def make(leaf):
                target = layout.get_path(abstract, leaf.path)
                r = raw[leaf.path]
                if r.inline is not None:
                    whole = np.frombuffer(r.inline, r.dtype, math.prod(r.shape)).reshape(r.shape)
                else:
                    whole = np.memmap(r.file, r.dtype, "r", r.offset, r.shape) if r.nbytes else np.empty(r.shape, r.dtype)
                dt = np.dtype(target.dtype)
                # One device at a time, each copy placed before the next is made: the host holds
                # one device's block beyond what is placed (make_array_from_callback would make
                # every device's copy first: a whole leaf).
                indices = target.sharding.addressable_devices_indices_map(target.shape)
                shards = [jax.device_put(np.array(whole[index], dt), d).block_until_ready()
                          for d, index in indices.items()]
                del whole  # the mapping closes once the shards are copied out
                return jax.make_array_from_single_device_arrays(target.shape, target.sharding, shards)

            return layout.nest({leaf.path: make(leaf) for leaf in leaves})
        tree = layout.nest({leaf.path: layout.get_path(abstract, leaf.path) for leaf in leaves})
        with _context(partial_load=leaves is not layout.LEAVES):
            return ocp.load(self.path / PARAMS_DIR, tree)


class _Raw(NamedTuple):
    file: Path | None  # the data file holding the leaf's bytes, C order, little-endian
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype
    inline: bytes | None = None  # the bytes themselves, for a value small enough to sit in the tree (file None)


def _raw_locations(params: Path) -> dict[layout.Path, _Raw] | None:
    """Where each leaf's bytes lie in the files orbax wrote, for the layout this module writes.

    orbax stores each array as a zarr3 array inside an OCDBT database (tensorstore): one chunk per
    leaf, wrapped in zarr's sharding codec (the chunk's raw bytes, then a 16-byte index and its
    crc32c). OCDBT keeps such a value uncompressed at a byte range of a data file; its B+tree says
    where, which `tensorstore.ocdbt.dump` (a public API) shows. Reading those bytes ourselves puts
    them straight into the caller's buffer, where tensorstore holds the encoded chunk and the
    decoded array at once (2x the leaf). Anything not exactly that simple layout (several chunks,
    compression, other codecs, a deeper tree) gives None, and the reader falls back to orbax.
    """
    try:
        import tensorstore as ts

        dbs = [d for d in params.iterdir() if (d / "manifest.ocdbt").is_file()]
        if len(dbs) != 1 or np.little_endian is False:
            return None
        root = dbs[0]
        base = ts.KvStore.open({"driver": "file", "path": str(root) + "/"}).result()
        manifest = ts.ocdbt.dump(base).result()
        versions = manifest.get("versions") or []
        if not versions:
            return None
        latest = max(versions, key=lambda v: v["generation_number"])
        location = latest["root"].get("location")
        if latest.get("root_height") != 0 or not location:
            return None
        node = ts.ocdbt.dump(base, location).result()
        if node.get("height") != 0:
            return None
        entries = {e["key"].decode(): e for e in node["entries"]}
        out = {}
        for leaf in layout.LEAVES:
            name = ".".join(leaf.path)
            meta = json.loads(entries[f"{name}/zarr.json"]["inline_value"])
            shape = tuple(meta["shape"])
            dtype = np_dtype(meta["data_type"])
            simple = {"configuration": {"chunk_shape": list(shape), "codecs": [
                {"configuration": {"endian": "little"}, "name": "bytes"}], "index_codecs": [
                {"configuration": {"endian": "little"}, "name": "bytes"}, {"name": "crc32c"}]},
                "name": "sharding_indexed"}
            if (meta.get("chunk_grid") != {"configuration": {"chunk_shape": list(shape)}, "name": "regular"}
                    or meta.get("codecs") != [simple] or meta.get("chunk_key_encoding") != {"name": "default"}):
                return None
            chunk = entries.get(f"{name}/c/" + "/".join("0" * len(shape)) if shape else f"{name}/c") or {}
            nbytes = math.prod(shape) * dtype.itemsize
            index = np.zeros(2, "<u8")
            if "inline_value" in chunk:  # small values live in the tree itself
                inline = chunk["inline_value"]
                if len(inline) != nbytes + 20:
                    return None
                index[...] = np.frombuffer(inline[nbytes:nbytes + 16], "<u8")
                raw = _Raw(None, 0, nbytes, shape, dtype, inline[:nbytes])
            else:
                ref = chunk.get("indirect_value")
                if not ref or not ref.startswith("value:"):
                    return None
                where, value_offset, value_length = ref[len("value:"):].rsplit(":", 2)
                base_path, _, rel = where.partition(":")
                file = root / base_path / rel
                value_offset, value_length = int(value_offset), int(value_length)
                if value_length != nbytes + 20 or not read_into(file, value_offset + nbytes, index):
                    return None
                raw = _Raw(file, value_offset, nbytes, shape, dtype)
            if (int(index[0]), int(index[1])) != (0, nbytes):  # the one inner chunk, at the start
                return None
            out[leaf.path] = raw
        return out
    except Exception:  # any surprise: orbax reads it instead
        return None


def _flat_keys(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_keys(v, prefix + (k,))
    else:
        yield "/".join(prefix)
