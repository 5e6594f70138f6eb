"""Host memory of loading a checkpoint for training on 8 devices: the restore into fsdp=8 shardings.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/load.py CKPT [--mesh fsdp=8]

CKPT is any checkpoint `nemo_jax.checkpoint.restore` reads (HF / Mistral safetensors, nemo_jax
orbax). The restore is the one training uses (abstract arrays carrying the mesh's shardings, each
device's shard built from what it covers); nothing is computed on the weights.

On fake CPU devices every device's shards live in this one process, so the shards placed are host
memory too, and a 12B model's would not fit a small VM. The restore therefore goes leaf by leaf,
each leaf's arrays deleted once measured, and what is reported is the transient: the peak heap
(anonymous RSS, page cache and mapped files excluded) above what was already held plus the leaf's
placed shards. A host of a real 8-GPU machine holds only that transient, the shards going to the GPUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def anon_rss() -> int:
    return int([line for line in open("/proc/self/status") if line.startswith("RssAnon:")][0].split()[1]) * 1024


class PeakSampler:
    """The peak anonymous RSS since the last `reset`, sampled every 5 ms by a thread."""

    def __init__(self):
        self.peak = anon_rss()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak = max(self.peak, anon_rss())
            time.sleep(0.005)

    def reset(self) -> int:
        self.peak = now = anon_rss()
        return now


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--mesh", default="fsdp=8", help="mesh axes (default fsdp=8)")
    args = p.parse_args()

    import jax

    from nemo_jax import sharding as S
    from nemo_jax.checkpoint import layout, open_checkpoint
    from nemo_jax.evaluate import param_shardings

    mesh = S.make_mesh(**S.parse_mesh(args.mesh))
    source = open_checkpoint(args.ckpt)
    config = source.config
    shardings = param_shardings(config, mesh)
    abstract = source.abstract()
    sampler = PeakSampler()
    total = worst = per_device = 0
    worst_leaf, start = None, time.perf_counter()
    for leaf in layout.LEAVES:
        a, sh = layout.get_path(abstract, leaf.path), layout.get_path(shardings, leaf.path)
        target = layout.nest({leaf.path: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)})
        base = sampler.reset()
        arr = layout.get_path(source.restore(target, leaves=[leaf]), leaf.path)
        arr.block_until_ready()
        placed = math.prod(a.shape) * a.dtype.itemsize
        shards = [s.data.nbytes for s in arr.addressable_shards]
        transient = max(0, max(sampler.peak, anon_rss()) - base - placed)
        if transient >= worst:
            worst, worst_leaf = transient, leaf.key()
        total += placed
        per_device += max(shards)
        arr.delete()
        del arr
    secs = time.perf_counter() - start
    print(f"load {args.ckpt} ({source.format}, {total / 1e9:.2f} GB) onto {len(jax.devices())} devices, "
          f"{S.describe(mesh)}: {secs:.1f} s; largest device "
          f"holds {per_device / 1e9:.2f} GB; host heap beyond the placed shards peaks at {worst / 1e9:.2f} GB "
          f"= {worst / total:.3f}x the model ({worst_leaf})")


if __name__ == "__main__":
    main()
