"""Training run directories as checkpoints: `load`, `restore` and `export` accept them too.

A run's newest checkpoint holds either the whole model (full fine-tuning) or only LoRA adapters
plus a reference to the base (run.json). `RunSource` serves the model weights with the adapters
merged, and keeps the adapters themselves for `export --format peft`.
"""

from __future__ import annotations

from pathlib import Path

from nemo_jax.checkpoint.sources import ParamsSource
from nemo_jax.errors import UserError


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "run.json").is_file()


class RunSource(ParamsSource):
    def __init__(self, path: Path):
        from nemo_jax import lora as lora_lib
        from nemo_jax.trainer import load_run

        config, params, self.lora_params, self.lora = load_run(path)
        self.base_path = None
        if self.lora is not None:
            from nemo_jax.train_loop import read_run_info

            self.base_path = read_run_info(path)["base"]["checkpoint"]
            params = lora_lib.merge(params, self.lora_params, self.lora)
        what = "LoRA merged" if self.lora else "full fine-tune"
        super().__init__(config, params, path, f"{path} (training run, {what})")


def export_peft(source, out: Path, opts) -> None:
    """adapter_config.json + adapter_model.safetensors for HF PEFT, from a LoRA training run."""
    from nemo_jax import lora as lora_lib

    if not isinstance(source, RunSource) or source.lora is None:
        raise UserError(f"{source.path}: --format peft needs a LoRA training run directory")
    lora_lib.export_peft(out, source.lora_params, source.lora, source.base_path or str(source.path))
