"""Multi-host start-up: `jax.distributed.initialize` from flags, environment or SLURM.

Every process of a multi-host run executes the same `train.py` command. Each one must call this
before anything touches a device; afterwards `jax.devices()` lists every host's accelerators and
the mesh spans them all. Sources, in order:
  1. flags `--coordinator-address HOST:PORT --num-processes N --process-id I`;
  2. environment `NEMO_JAX_COORDINATOR`, `NEMO_JAX_NUM_PROCESSES`, `NEMO_JAX_PROCESS_ID`;
  3. SLURM (`srun` with more than one task): JAX reads the coordinator and ids from SLURM's variables.
With none of these the run is single-process and nothing is initialised.
"""

from __future__ import annotations

import os

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
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()
        return True
    return False


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
