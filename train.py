"""Train or fine-tune Mistral NeMo: `python train.py --config configs/lora.yaml [--set key.path=value ...]`.

Re-running the same command resumes from the newest checkpoint in the config's output_dir.
"""

import argparse

from nemo_jax.errors import UserError, cli_main
from nemo_jax.backend import select_platform
from nemo_jax.runtime import tune_malloc


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/ and the README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="load no weights: compile the step for the configured mesh and report parameters, "
                        "FLOPs and per-device memory")
    p.add_argument("--device-memory", metavar="SIZE", help="with --dry-run: say whether it fits, e.g. 80GB "
                   "(default with --target: the GPU's memory)")
    p.add_argument("--target", choices=("h100", "h200"),
                   help="with --dry-run: compile the GPU program for this GPU, deviceless, on this machine "
                        "(needs the aot extra: pip install -e '.[aot]')")
    p.add_argument("--coordinator-address", metavar="HOST:PORT", help="multi-host: process 0's address")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (hosts); with --target, "
                   "the hosts of the planned run (8 GPUs each when a mesh axis is -1)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    args = p.parse_args(argv)

    if args.target:
        if not args.dry_run:
            raise UserError("--target: plans a GPU run without a GPU; it needs --dry-run")
        from nemo_jax import aot

        aot.require()
        aot.use_cpu_backend()  # the GPU program is built by this CPU process; no processes to join
    else:
        from nemo_jax.distributed import initialize

        initialize(args.coordinator_address, args.num_processes, args.process_id)

    from nemo_jax.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from nemo_jax.plan import dry_run, format_report, parse_bytes

        mem = parse_bytes(args.device_memory) if args.device_memory else None
        print(format_report(dry_run(cfg, mem, args.target, args.num_processes)))
        return
    from nemo_jax.trainer import train

    train(cfg)


if __name__ == "__main__":
    # First, before JAX exists: XLA's CPU buffers then reuse one malloc heap instead of page-faulting
    # fresh mmaps every step (allocator parameters only; see nemo_jax/runtime.py).
    select_platform()
    tune_malloc()
    main()
