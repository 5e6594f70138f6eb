"""Checkpoint conversion: bit-exact round trips, transformers loads our export, restore into
shardings, and one clear error for each kind of bad input."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import nemo_jax
from nemo_jax import checkpoint
from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.host import Scratch, transpose_into
from nemo_jax.checkpoint.safetensors_io import SafetensorsFile, Writer
from nemo_jax.convert import main
from nemo_jax.errors import UserError
from nemo_jax.model import abstract_variables, logits
from reference.hf_mistral import hf_logits, save_random_hf, write_mistral_from_hf

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Small random checkpoints: fp32 HF sharded 5 ways, its Mistral twin, bf16 HF and its Mistral twin."""
    root = tmp_path_factory.mktemp("convert")
    hf32 = save_random_hf(root / "hf32", seed=1, max_shard_size="100KB")
    hf16 = save_random_hf(root / "hf16", seed=2, dtype=torch.bfloat16)
    return {"hf32": hf32, "mistral32": write_mistral_from_hf(hf32, root / "mistral32"),
            "hf16": hf16, "mistral16": write_mistral_from_hf(hf16, root / "mistral16")}


def cli(*args) -> None:
    """Run the CLI in-process. A UserError surfaces as SystemExit(2) with one line on stderr."""
    main([str(a) for a in args] + ["--no-progress"])


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_exact(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert (ta[name].dtype, ta[name].shape) == (tb[name].dtype, tb[name].shape), name
        assert ta[name].tobytes() == tb[name].tobytes(), name


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["hf32", "hf16", "mistral32", "mistral16"])
def test_round_trip_is_bit_exact(sources, tmp_path, src):
    fmt = src[:-2]
    cli("import", sources[src], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "nemo_jax" and config["model"]["param_dtype"] == (
        "float32" if src.endswith("32") else "bfloat16")
    cli("export", tmp_path / "ckpt", tmp_path / "out", "--format", fmt)
    assert_bit_exact(sources[src], tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


@pytest.mark.parametrize("block_bytes", [1, 40 * 64 * 4])  # one row-unit per block; blocks that do not divide
def test_conversion_in_small_blocks(sources, tmp_path, monkeypatch, block_bytes):
    want = {src: checkpoint.load(sources[src])[1] for src in ("hf32", "mistral32")}
    monkeypatch.setattr(layout, "BLOCK_BYTES", block_bytes)
    for src in ("hf32", "mistral32"):
        jax.tree.map(np.testing.assert_array_equal, checkpoint.load(sources[src])[1], want[src])
        cli("export", sources["hf32"], tmp_path / src, "--format", src[:-2])
        assert_bit_exact(sources[src], tmp_path / src)


def test_raw_leaf_reads_match_orbax(sources, tmp_path, monkeypatch):
    """OrbaxSource reads leaves straight from orbax's data files; orbax itself must agree."""
    from nemo_jax.checkpoint import orbax_io

    cli("import", sources["hf16"], tmp_path / "ckpt")
    raw = checkpoint.open_checkpoint(tmp_path / "ckpt")
    assert raw._raw_location(layout.LEAVES[0]) is not None  # the fast path is taken for our own layout
    monkeypatch.setattr(orbax_io, "_raw_locations", lambda params: None)
    via_orbax = checkpoint.open_checkpoint(tmp_path / "ckpt")
    for leaf in layout.LEAVES:
        for dtype, layers in (("bfloat16", None), ("float32", None), ("bfloat16", slice(1, 2))):
            if layers is not None and not leaf.stacked:
                continue
            a, b = raw.read_leaf(leaf, dtype, layers), via_orbax.read_leaf(leaf, dtype, layers)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), leaf.key()
    cli("export", tmp_path / "ckpt", tmp_path / "out", "--format", "hf")  # the fallback exports the same bytes
    assert_bit_exact(sources["hf16"], tmp_path / "out")


def test_large_leaves_stay_one_chunk_and_chunked_checkpoints_still_load(sources, tmp_path, monkeypatch):
    """orbax splits a leaf above its OCDBT data-file target (2 GiB, which 12B's 5.9 GB MLP stacks
    exceed) into chunks, and tensorstore then copies the whole leaf to save it; our saves keep one
    chunk per leaf. A checkpoint in orbax's chunked layout still loads, restores and exports."""
    from orbax.checkpoint import v1 as ocp
    from orbax.checkpoint._src.serialization import tensorstore_utils

    from nemo_jax.checkpoint import orbax_io

    monkeypatch.setattr(tensorstore_utils, "_DEFAULT_OCDBT_TARGET_DATA_FILE_SIZE", 4096)  # every leaf is "large"
    cli("import", sources["hf16"], tmp_path / "ckpt")
    ours = checkpoint.open_checkpoint(tmp_path / "ckpt")
    assert all(ours._raw_location(leaf) is not None for leaf in layout.LEAVES)

    config, params = checkpoint.load(tmp_path / "ckpt")
    ctx = orbax_io._context()
    ctx.array.saving.ocdbt_target_data_file_size = None  # orbax's own choice: chunks of 4096 bytes
    (tmp_path / "chunked").mkdir()
    with ctx:
        ocp.save(tmp_path / "chunked" / orbax_io.PARAMS_DIR, params)
    orbax_io.write_config(tmp_path / "chunked", config)
    chunked = checkpoint.open_checkpoint(tmp_path / "chunked")
    assert chunked._raw_location(layout.LEAVES[0]) is None
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load(tmp_path / "chunked")[1], params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    leaf = next(leaf for leaf in layout.LEAVES if leaf.stacked)
    for source in (ours, chunked):  # one leaf alone, from the raw bytes and through orbax
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), source.abstract())
        got = layout.get_path(source.restore(target, leaves=[leaf]), leaf.path)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(layout.get_path(params, leaf.path)))
    cli("export", tmp_path / "chunked", tmp_path / "out", "--format", "hf")
    assert_bit_exact(sources["hf16"], tmp_path / "out")


def test_background_writer_reports_errors_and_stops(tmp_path, monkeypatch):
    entries = [("a", np.dtype(np.float32), (64, 4)), ("b", np.dtype(np.float32), (8,))]
    arrays = {"a": np.arange(256, dtype=np.float32).reshape(64, 4), "b": np.ones(8, np.float32)}
    with Writer(tmp_path / "bg.safetensors", entries, background=True, depth=1) as w:
        def blocks():
            for r0 in range(0, 64, 8):
                blk = w.block((8, 4), np.float32)
                blk[...] = arrays["a"][r0:r0 + 8]
                yield blk
        w.write("a", blocks())
        w.write("b", arrays["b"])
    f = SafetensorsFile(tmp_path / "bg.safetensors")
    assert all(f.read(k).tobytes() == v.tobytes() for k, v in arrays.items())

    def broken(self, data):
        if self._thread is not None and threading.current_thread() is self._thread:
            raise OSError("disk full")
        return real(self, data)

    real = Writer._put
    monkeypatch.setattr(Writer, "_put", broken)
    with pytest.raises(OSError, match="disk full"):
        with Writer(tmp_path / "bad.safetensors", entries, background=True, depth=1) as w:
            w.write("a", arrays["a"])
            w.write("b", arrays["b"])
    assert not [t for t in threading.enumerate() if t.name.startswith("write ")]  # joined


def test_transformers_loads_the_hf_export(sources, tmp_path):
    cli("import", sources["mistral32"], tmp_path / "ckpt")  # Mistral in, HF out: the rope permutation too
    cli("export", tmp_path / "ckpt", tmp_path / "hf", "--format", "hf", "--max-shard-size", "60KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for s in shards:  # each shard within the limit unless it is one tensor larger than it
        f = SafetensorsFile(s)
        assert sum(e.nbytes for e in f.entries.values()) <= 60_000 or len(f.entries) == 1
    tokens = np.random.default_rng(1).integers(0, 256, (1, 64))
    np.testing.assert_array_equal(hf_logits(tmp_path / "hf", tokens), hf_logits(sources["hf32"], tokens))


def test_mistral_export_matches_the_independent_permutation(sources, tmp_path):
    cli("export", sources["hf32"], tmp_path / "direct", "--format", "mistral")  # export reads HF directly too
    assert_bit_exact(sources["mistral32"], tmp_path / "direct")
    assert json.loads((tmp_path / "direct" / "params.json").read_text())["n_kv_heads"] == 2


def test_all_layouts_load_the_same_params(sources, tmp_path):
    cli("import", sources["hf32"], tmp_path / "ckpt")
    loaded = [checkpoint.load(p) for p in (sources["hf32"], sources["mistral32"], tmp_path / "ckpt")]
    for config, params in loaded[1:]:
        assert config.replace(max_seq_len=1) == loaded[0][0].replace(max_seq_len=1)  # params.json has none
        jax.tree.map(np.testing.assert_array_equal, params, loaded[0][1])
    config, abstract = checkpoint.load_abstract(tmp_path / "ckpt")
    want = abstract_variables(config)["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), want)


def test_dtype_conversion(sources, tmp_path):
    config, params = checkpoint.load(sources["hf32"], dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    cli("import", sources["hf32"], tmp_path / "ckpt", "--dtype", "bfloat16")
    config16, params16 = checkpoint.load(tmp_path / "ckpt")
    assert config16 == config
    jax.tree.map(np.testing.assert_array_equal, params16, params)
    cli("import", sources["hf32"], tmp_path / "ckpt32")
    config16, params16 = nemo_jax.load(tmp_path / "ckpt32", dtype="bfloat16")  # orbax casts on restore
    assert config16 == config
    jax.tree.map(np.testing.assert_array_equal, params16, params)
    cli("export", tmp_path / "ckpt", tmp_path / "hf", "--format", "hf", "--dtype", "float32")
    back = tensors(tmp_path / "hf")
    for name, x in tensors(sources["hf32"]).items():  # bf16 -> fp32 is exact: the rounding is all there is
        np.testing.assert_array_equal(back[name], x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_in_memory_params_export_like_the_checkpoint(sources, tmp_path):
    config, params = checkpoint.load(sources["mistral16"])
    source = checkpoint.ParamsSource(config, params, tmp_path / "run")
    checkpoint.export_checkpoint(source, tmp_path / "out", "mistral")
    assert_bit_exact(sources["mistral16"], tmp_path / "out")


def test_save_orbax_and_logits(sources, tmp_path):
    config, params = checkpoint.load(sources["hf16"])
    checkpoint.save_orbax(tmp_path / "saved", config, params)
    config2, params2 = checkpoint.load(tmp_path / "saved")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    tokens = np.arange(32)[None]
    np.testing.assert_array_equal(logits(config, params, tokens), logits(config2, params2, tokens))
    with pytest.raises(UserError, match="not empty"):
        checkpoint.save_orbax(tmp_path / "saved", config, params)


RESTORE_SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import nemo_jax
from nemo_jax import checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
def shardings(abstract):  # shard every leaf's last axis 4 ways and its first 2 ways where they divide
    def spec(x):
        first = "b" if x.ndim > 1 and x.shape[0] % 2 == 0 else None
        return NamedSharding(mesh, P(first, *[None] * (x.ndim - 2), "a") if x.ndim > 1 else P("a"))
    return jax.tree.map(spec, abstract)
_, want = checkpoint.load(SRC)
for path in (SRC, CKPT):
    config, params = checkpoint.restore(path, shardings)
    for got, w, s in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(shardings(want))):
        assert got.sharding == s, (got.sharding, s)
        shards = got.addressable_shards
        assert len({sh.data.shape for sh in shards}) == 1 and shards[0].data.size < got.size
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
print("ok", len(jax.devices()))
"""


def test_restore_into_shardings_on_8_devices(sources, tmp_path):
    cli("import", sources["mistral16"], tmp_path / "ckpt")
    script = RESTORE_SHARDED.replace("SRC", repr(str(sources["mistral16"])))
    script = script.replace("CKPT", repr(str(tmp_path / "ckpt")))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "ok 8" in r.stdout, r.stderr[-3000:]


# --- safety -------------------------------------------------------------------------------------------


def test_refuses_a_non_empty_output_without_force(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    err = cli_error(capsys, "import", sources["hf16"], out)
    assert str(out) in err and "--force" in err
    assert (out / "keep.txt").exists()
    cli("import", sources["hf16"], out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params"]
    cli_error(capsys, "import", sources["hf16"], sources["hf16"], "--force")  # never over the input


def test_interrupted_conversion_leaves_nothing(sources, tmp_path, monkeypatch):
    old = tmp_path / "out"
    cli("import", sources["hf16"], old)
    calls = []

    def interrupted(self, leaf, value):
        calls.append(leaf)
        if len(calls) >= 3:  # the first run writes two leaves, the second none
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.StreamingWriter, "add", interrupted)
    with pytest.raises(SystemExit) as e:
        cli("import", sources["hf32"], tmp_path / "new")
    assert e.value.code == 130
    with pytest.raises(SystemExit) as e:
        cli("import", sources["hf32"], old, "--force")
    assert e.value.code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no "new", no temporaries
    assert checkpoint.load(old)[0].param_dtype == "bfloat16"  # the old checkpoint is intact


# --- bad inputs: one line naming the file and the tensor ---------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_single(src: Path, dst: Path, edit) -> Path:
    """An HF dir whose model.safetensors holds edit(tensors)."""
    copy_dir(src, dst)
    t = load_file(dst / "model.safetensors")
    save_file(edit(t), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_cli_error_is_one_line_without_traceback(sources, tmp_path):
    bad = copy_dir(sources["hf16"], tmp_path / "bad")
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(bad / "model.safetensors") - 100)
    r = subprocess.run([sys.executable, "-m", "nemo_jax.convert", "import", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "truncated" in r.stderr and str(bad / "model.safetensors") in r.stderr
    assert "tensor 'model.norm.weight' is cut off" in r.stderr  # the last tensor in the file
    assert not (tmp_path / "out").exists()


def test_bad_inputs(sources, tmp_path, capsys):
    hf = sources["hf16"]
    out = tmp_path / "out"

    def err(src, *extra):
        return cli_error(capsys, "import", src, out, *extra)

    assert "not found" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in err(tmp_path / "empty")

    d = copy_dir(hf, tmp_path / "corrupt")
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"garbage!")
    e = err(d)
    assert "corrupt" in e and str(d / "model.safetensors") in e

    d = rewrite_single(hf, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if "1.mlp.up" not in k})
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in err(d)

    d = rewrite_single(hf, tmp_path / "extra", lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq":
                                                           np.zeros(12, np.float32)})
    e = err(d)
    assert "unexpected tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'" in e and "model.safetensors" in e

    d = copy_dir(hf, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    e = err(d)
    assert "'model.layers.0.mlp.gate_proj.weight' has shape [96, 64]" in e and "[128, 64]" in e

    d = copy_dir(hf, tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    assert "only safetensors" in err(d)

    d = copy_dir(sources["mistral16"], tmp_path / "nomistral")
    (d / "consolidated.safetensors").unlink()
    assert f"{d / 'consolidated.safetensors'}: file not found" in err(d)

    e = err(sources["hf16"], "--format", "mistral")
    assert "params.json: file not found" in e

    d = rewrite_single(hf, tmp_path / "fp16", lambda t: {k: v.astype(np.float16) for k, v in t.items()})
    e = err(d)
    assert "float16" in e and "--dtype" in e
    cli("import", d, tmp_path / "fp16-ok", "--dtype", "float32")  # with a dtype it converts

    assert "--max-shard-size" in cli_error(capsys, "export", hf, out, "--format", "hf", "--max-shard-size", "big")
    assert not out.exists()


def test_sharded_hf_errors(sources, tmp_path, capsys):
    d = copy_dir(sources["hf32"], tmp_path / "lost")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (d / shard).unlink()
    e = cli_error(capsys, "import", d, tmp_path / "out")
    assert f"{d / shard}: file not found" in e and "listed for tensor" in e

    d = copy_dir(sources["hf32"], tmp_path / "stale")
    index["weight_map"]["model.norm.weight"] = index["weight_map"]["lm_head.weight"] = shard = sorted(
        set(index["weight_map"].values()))[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    e = cli_error(capsys, "import", d, tmp_path / "out")
    assert str(d / shard) in e and "missing tensor" in e and "listed in model.safetensors.index.json" in e


# --- safetensors reader/writer against the library --------------------------------------------------------


def test_safetensors_writer_and_reader_agree_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
              "b": rng.standard_normal(7).astype(np.float32), "c": np.zeros((0, 4), np.float32)}
    entries = [(k, v.dtype, v.shape) for k, v in arrays.items()]
    with Writer(tmp_path / "ours.safetensors", entries, {"format": "pt"}) as w:
        for k, v in arrays.items():
            w.write(k, v)
    lib = load_file(tmp_path / "ours.safetensors")
    save_file(arrays, tmp_path / "lib.safetensors")
    f = SafetensorsFile(tmp_path / "lib.safetensors")
    for k, v in arrays.items():
        assert lib[k].tobytes() == v.tobytes() and lib[k].dtype == v.dtype
        assert f.read(k).tobytes() == v.tobytes() and f.read(k).shape == v.shape


@pytest.mark.parametrize("shape", [(300, 260), (7, 5), (1, 8), (130, 3)])
@pytest.mark.parametrize("src_dtype, dst_dtype", [(np.float32, np.float32), (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
                                                  (np.float16, np.float16), (np.float32, ml_dtypes.bfloat16),
                                                  (ml_dtypes.bfloat16, np.float32)])
def test_transpose_into(shape, src_dtype, dst_dtype):
    src = np.random.default_rng(0).standard_normal(shape).astype(src_dtype)
    dst = np.empty(shape[::-1], dst_dtype)
    transpose_into(dst, src, Scratch())
    np.testing.assert_array_equal(dst, src.T.astype(dst_dtype))


def test_layout_permutation_is_the_documented_one():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * 6, 5))
    documented = w.reshape(4, 6 // 2, 2, 5).transpose(0, 2, 1, 3).reshape(24, 5)
    np.testing.assert_array_equal(layout.permute(w, 4), documented)
    np.testing.assert_array_equal(layout.unpermute(layout.permute(w, 4), 4), w)

