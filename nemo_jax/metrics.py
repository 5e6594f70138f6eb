"""Run metrics: metrics.jsonl (one object per logged step or eval), TensorBoard events, a loss plot."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """On resume, entries logged after the checkpoint are replayed by the resumed run: drop them."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        prefix = f"eval/{record['split']}/" if "split" in record else "train/"
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                self._tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


class NullWriter:
    """What processes other than 0 log with in a multi-host run: nothing."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path) -> Path | None:
    """PNG of the train loss and each eval split's loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "split" not in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*train), label="train", lw=1)
    splits = sorted({r["split"] for r in records if "split" in r})
    for split in splits:
        pts = [(r["step"], r["eval_loss"]) for r in records if r.get("split") == split]
        ax.plot(*zip(*pts), marker="o", label=f"eval: {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
