"""Sharded training on 8 fake CPU devices equals one device (tests/workers/sharded_steps.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from workers import run_on_8_devices

from nemo_jax import sharding as S
from nemo_jax.errors import UserError



@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_on_8_devices("sharded_steps.py", tmp_path_factory.mktemp("sharding") / "result.json")


@pytest.mark.parametrize("mesh,mode", [(m, "full") for m in ["data8", "fsdp8", "2x2x2", "1x2x4", "seq4"]]
                         + [("fsdp8", "lora"), ("2x2x2", "lora"), ("fsdp8", "qlora-nf4"), ("2x2x2", "qlora-nf4"),
                            ("fsdp8", "qlora-int8")])
def test_same_losses_as_one_device(result, mesh, mode):
    """2x2x2 runs the unrolled layer loop on per-layer arrays; the others the scan on stacked ones."""
    ref = result["losses"][f"single-{mode}"]
    got = result["losses"][f"{mesh}-{mode}"]
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, mode, got, ref)
    assert ref[-1] < ref[0]  # the steps really trained


def test_fsdp_really_shards(result):
    # every parameter of >= 4096 elements (and its Adam moments) is split 8 ways under fsdp=8
    assert result["fsdp8_max_shard_fraction_full"] == pytest.approx(1 / 8)
    assert result["fsdp8_opt_shard_fraction_full"] == pytest.approx(1 / 8)
    assert result["fsdp8_max_shard_fraction_lora"] == pytest.approx(1 / 8)
    assert result["fsdp8_qlora_nf4_codes"] == ["uint8", pytest.approx(1 / 8)]  # the NF4 base, split 8 ways
    assert result["fsdp8_qlora_int8_codes"] == ["int8", pytest.approx(1 / 8)]
    # from a checkpoint, quantised leaf by leaf on the 8 devices: the same NF4 tensors, split 8 ways
    assert result["qlora_restore_fsdp8"] == [True, pytest.approx(1 / 8)]


def test_restore_on_another_mesh(result):
    assert result["restore_other_mesh_equal"] is True
    assert result["restored_sharding"] == "P(None, 'fsdp', 'tensor', None)"
    assert result["restored_unrolled_equal"] is True


def test_unrolled_layers_keep_their_sharding(result):
    # q kernel [D, N, H]: D over fsdp, N over tensor, as the stacked [L, D, N, H] minus its L axis
    assert result["unrolled_q_sharding_full"] == "P('fsdp', 'tensor', None)"
    assert result["unrolled_q_sharding_lora"] == "P('fsdp', 'tensor', None)"


def test_mesh_shape_fill_and_errors():
    assert S.mesh_shape(1, -1, 2, 1, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    with pytest.raises(UserError, match="at most one axis"):
        S.mesh_shape(-1, -1, 1, 1, 8)
    with pytest.raises(UserError, match="8 devices"):
        S.mesh_shape(1, 3, 1, 1, 8)


def test_kv_heads_replicated_when_tensor_does_not_divide():
    class FakeMesh:  # the rules only read the axis sizes
        shape = {"data": 1, "fsdp": 1, "tensor": 16, "sequence": 1}

    spec = S.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), FakeMesh, (40, 5120, 8, 128))
    assert tuple(spec) == (None, None, None, None)
    spec = S.logical_to_spec(("layers", "embed", "heads", "head_dim"), FakeMesh, (40, 5120, 32, 128))
    assert tuple(spec) == (None, None, "tensor", None)


def test_dry_run_plans_the_12b_full_finetune_on_8_devices():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/full.yaml", "--set", "model.checkpoint=null",
                        "--set", "model.preset=mistral-nemo-12b", "--dry-run", "--device-memory", "80GB"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parameters            12,247,782,400 (12,247,782,400 trainable)" in r.stdout
    assert "fsdp=8" in r.stdout and "fits in 80.00 GiB per device" in r.stdout
    # FSDP: fp32 weights + two Adam moments = 12 bytes/param, split 8 ways
    args = float(r.stdout.split("arguments")[1].split("GiB")[0])
    assert abs(args - 12_247_782_400 * 12 / 8 / 2**30) < 0.1


def test_target_errors_are_one_line(monkeypatch, capsys):
    """--target without the aot extra, or without --dry-run: one line, exit 2, no traceback."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train
    from nemo_jax import aot

    monkeypatch.setattr(aot, "available", lambda: False)
    for argv, message in [(["--dry-run", "--target", "h100"], "needs the aot extra (pip install -e '.[aot]'"),
                          (["--target", "h100"], "--target: plans a GPU run without a GPU; it needs --dry-run")]:
        with pytest.raises(SystemExit) as e:
            train.main(["--config", "configs/tiny.yaml", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
