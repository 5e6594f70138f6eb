"""Multi-host runs on one machine: 2 processes x 4 CPU devices, talking over loopback with gloo.

For full fine-tuning (fsdp=8: each process feeds half of every batch) and LoRA (tensor=8: the tensor
axis spans both processes, which then feed the same rows), one test each: train.py on two processes
gives the losses of one device (which the 8-device meshes equal, test_sharding.py); a SIGTERM to
process 0 and another to process 1 1.5 s later stop both after the same step with exit 143 and one
complete checkpoint; the run resumes, on one device, with the uninterrupted run's losses; eval.py
on the result scores what the uninterrupted run scores, on one device and (full) on the run's own
8-device mesh; and its exports are its weights.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nemo_jax

from nemo_jax import sharding as S
from nemo_jax.errors import UserError
from nemo_jax.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "tests/fixtures/data/tiny_train.jsonl"
EVAL = ROOT / "tests/fixtures/data/tiny_eval.jsonl"
COMMON = ("train.batch_size=8", "train.seq_len=32", "train.loss_chunk=16", "train.schedule=constant",
          f"data.train=[{TRAIN}]")
MODES = {
    "full": ("mesh.fsdp=8",),
    # streamed data (data.streaming): the stop on 2 hosts and the resume on 1 continue the same batches
    "lora": ("mesh.tensor=8", "lora.enabled=true", "lora.rank=4", "train.lr=1e-2", "data.streaming=true",
             "data.shuffle_window=16"),
}


def losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, overrides) -> list[subprocess.Popen]:
    """train.py as processes 0 and 1 of a 2-process run, 4 CPU devices each."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    sets = [a for o in (f"output_dir={out}", *overrides) for a in ("--set", o)]
    return [subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.yaml", *sets,
                              "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs, timeout=300) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def run_in_process(out: Path, overrides):
    """The same run on this process's one device."""
    from nemo_jax.trainer import train

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", "checkpoint.async_save=false",
                                                   *overrides, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    return train(cfg)


def eval_cli(args) -> dict:
    """eval.py's main, in this process (on its one device)."""
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF checkpoint to fine-tune (reading it costs far less than compiling a random init)."""
    from tests.reference.hf_mistral import save_random_hf

    return save_random_hf(tmp_path_factory.mktemp("base") / "hf", vocab_size=1280)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_processes_train_stop_resume_and_evaluate(tmp_path, base, mode):
    overrides = (*COMMON, "model.preset=null", f"model.checkpoint={base}", *MODES[mode])
    run = tmp_path / "run"
    procs = launch(run, (*overrides, "train.steps=100000"))
    deadline = time.time() + 240
    while time.time() < deadline and len(losses(run) if (run / "metrics.jsonl").exists() else {}) < 2:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    # what a scheduler does: the same signal to every process, not at the same moment
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(1.5)
    if procs[1].poll() is None:  # it may already have stopped with process 0: that is the point
        procs[1].send_signal(signal.SIGTERM)
    logs = finish(procs)
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 143, f"process {i}:\n{log[-3000:]}"
        assert "Traceback" not in log and "run the same command again to resume" in log, log[-3000:]
    stopped = sorted(int(d.name) for d in (run / "checkpoints").iterdir())
    assert len(stopped) == 1 and stopped[0] >= 2, stopped  # one complete checkpoint, no temporary ones
    step = stopped[0]
    assert f"stopped at step {step};" in logs[0] and f"stopped at step {step};" in logs[1]
    assert sorted(losses(run)) == list(range(1, step + 1))

    # resumed on one device: the run continues with the uninterrupted run's losses
    run_in_process(run, (*overrides, f"train.steps={step + 2}"))
    ref = run_in_process(tmp_path / "ref", (*overrides, f"train.steps={step + 2}"))
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, step + 3))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
    assert want[step + 2] < want[1]  # it trained

    scores = {}
    for name, path in (("run", run), ("ref", ref)):
        out = tmp_path / f"{name}.json"
        eval_cli(["--checkpoint", str(path), "--data", str(EVAL), "--out", str(out)])
        scores[name] = json.loads(out.read_text())["tiny_eval"]
    assert scores["run"]["tokens"] == scores["ref"]["tokens"] > 0
    assert scores["run"]["loss"] == pytest.approx(scores["ref"]["loss"], rel=1e-5)

    # exported from this one device: the run's weights (LoRA merged; the adapters for PEFT)
    from nemo_jax import convert

    config, params = nemo_jax.load(run)
    for fmt in ("hf", "peft") if mode == "lora" else ("hf", "mistral"):
        convert.main(["export", str(run), str(tmp_path / fmt), "--format", fmt, "--no-progress"])
    _, exported = nemo_jax.load(tmp_path / "hf")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, exported, params)))
    if mode == "full":  # and evaluated on the run's own mesh (fsdp=8) on 8 devices: the same loss
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        r = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(run), "--data", str(EVAL), "--out",
                            str(tmp_path / "on8.json")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        on8 = json.loads((tmp_path / "on8.json").read_text())["tiny_eval"]
        assert on8["tokens"] == scores["run"]["tokens"]
        assert on8["loss"] == pytest.approx(scores["run"]["loss"], rel=1e-5)


class _Sharding:
    """What S.process_rows reads of a sharding: each of this process's devices' slice of the batch."""

    def __init__(self, rows):
        self.rows = rows

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.rows)}


def test_process_rows_come_from_the_devices_slices():
    # the second of two processes on fsdp=8: devices 4..7 hold rows 8..15 of 16
    assert S.process_rows(_Sharding([(8, 10), (10, 12), (12, 14), (14, 16)]), (16, 32)) == (1, 2)
    # tensor axis across the processes: every device holds every row, one block for all
    assert S.process_rows(_Sharding([(None, None)] * 4), (16, 32)) == (0, 1)
    # data=2 x tensor=2 within the process: two devices per block of rows
    assert S.process_rows(_Sharding([(0, 8), (0, 8), (8, 16), (8, 16)]), (32, 32)) == (0, 2)
    with pytest.raises(UserError, match="not one contiguous block"):
        S.process_rows(_Sharding([(0, 4), (8, 12)]), (16, 32))


def test_a_stopping_process_ignores_a_repeated_sigterm():
    """After the stop (checkpoint saved, sys.exit), a scheduler's SIGTERM that reaches a process while it
    exits must not kill it in jax.distributed's shutdown barrier (its peers would abort there)."""
    import sys as _sys

    from nemo_jax.train_loop import StopFlag

    before = signal.getsignal(signal.SIGTERM)
    try:
        with StopFlag():
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is before  # a run that finishes restores the handler
        with pytest.raises(SystemExit):
            with StopFlag():
                _sys.exit(143)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
