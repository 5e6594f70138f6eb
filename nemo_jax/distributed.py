"""Multi-host start-up: `jax.distributed.initialize` from flags, environment or SLURM.

Every process of a multi-host run executes the same `train.py` command. Each one must call this
before anything touches a device; afterwards `jax.devices()` lists every host's accelerators and
the mesh spans them all. Sources, in order:
  1. flags `--coordinator-address HOST:PORT --num-processes N --process-id I`;
  2. environment `NEMO_JAX_COORDINATOR`, `NEMO_JAX_NUM_PROCESSES`, `NEMO_JAX_PROCESS_ID`;
  3. SLURM (`srun` with more than one task): JAX reads the coordinator and ids from SLURM's variables.
With none of these the run is single-process and nothing is initialised.

When a process dies, the others must not wait for it forever. A collective with it either fails
at once (gloo on CPU: the connection resets) or blocks (NCCL); JAX's coordination service then
declares it dead after HEARTBEAT_TIMEOUT_S without a heartbeat and terminates the others. JAX's
default of 100 s is shortened to 60 s (heartbeats come from a thread of their own, so a long
step, compilation or checkpoint save does not delay them); NEMO_JAX_HEARTBEAT_TIMEOUT (seconds)
overrides it. A process that finishes first waits at most SHUTDOWN_TIMEOUT_S for the others.
"""

from __future__ import annotations

import contextlib
import os
import sys

HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 120

from nemo_jax.errors import UserError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the multi-host run if one is described; return whether one was."""
    import jax

    coordinator = coordinator or os.environ.get("NEMO_JAX_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _int_env("NEMO_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("NEMO_JAX_PROCESS_ID")
    if coordinator or num_processes is not None or process_id is not None:
        missing = [n for n, v in (("--coordinator-address", coordinator), ("--num-processes", num_processes),
                                  ("--process-id", process_id)) if v is None]
        if missing:
            raise UserError(f"multi-host: {', '.join(missing)} missing (give all three, as flags or "
                            f"NEMO_JAX_* variables)")
        if not 0 <= process_id < num_processes:
            raise UserError(f"multi-host: --process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id, **_timeouts())
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize(**_timeouts())
        return True
    return False


def _timeouts() -> dict:
    heartbeat = _int_env("NEMO_JAX_HEARTBEAT_TIMEOUT")
    if heartbeat is not None and heartbeat < 1:
        raise UserError(f"NEMO_JAX_HEARTBEAT_TIMEOUT={heartbeat}: expected a positive number of seconds")
    return {"heartbeat_timeout_seconds": heartbeat or HEARTBEAT_TIMEOUT_S,
            "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}


@contextlib.contextmanager
def peers_fail_fast():
    """In a multi-process run, a failed device computation (a collective whose peer died, or any
    other runtime error) ends this process at once with one line, instead of a traceback followed by
    a wait at JAX's shutdown barrier for a peer that will never arrive (then an abort). The checkpoints
    already complete stay usable; a half-written one is skipped on resume."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: process {jax.process_index()}: a computation with the other processes failed ({first}); "
              f"if another process died or was stopped at once, its log says why", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{name}={v!r}: expected an integer") from None


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
