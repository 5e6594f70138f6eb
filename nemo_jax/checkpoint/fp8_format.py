"""The FP8 checkpoint format in config.json: compressed-tensors' `quantization_config` for a static
per-tensor FP8 (W8A8) model, written by `export --format hf-fp8` (fp8_io.py) and read when any HF
checkpoint is opened (sources.py dequantises what it describes).

`parse_quantization` accepts this form and vLLM's `"quant_method": "fp8"` form (the same tensors)
and refuses what it cannot represent (block-wise or per-channel scales, other bit widths).
"""

from __future__ import annotations

import dataclasses
import re

from nemo_jax.config import PROJECTIONS, ModelConfig, hf_module
from nemo_jax.errors import UserError


def _args(dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "observer": "minmax", "actorder": None}


def quantization_config(config: ModelConfig, targets: tuple[str, ...]) -> dict:
    """compressed-tensors' description of a static per-tensor FP8 (W8A8) model."""
    ignore = [] if "lm_head" in targets else ["lm_head"]
    for t in PROJECTIONS:
        if t not in targets:  # a Linear not quantised: listed by name
            ignore += [hf_module(t, i) for i in range(config.n_layers)]
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": _args(False),
                                      "input_activations": _args(False), "output_activations": None,
                                      "format": "float-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    targets: tuple[str, ...]  # which of q/k/v/o/gate/up/down/lm_head are stored in FP8
    static_inputs: bool  # input_scale tensors present


def parse_quantization(qc: dict, config: ModelConfig, source: str) -> Fp8Format:
    """The FP8 layout a config.json's quantization_config describes, or a one-line refusal."""
    method = qc.get("quant_method")
    where = f"{source}: quantization_config"
    if method == "fp8":  # vLLM / AutoFP8: per-tensor e4m3 weights (+ static input scales)
        if qc.get("weight_block_size"):
            raise UserError(f"{where}.weight_block_size: block-wise FP8 scales are not supported "
                            "(only per-tensor)")
        scheme = qc.get("activation_scheme", "static")
        ignore = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
        return Fp8Format(_targets_from_ignore(ignore, config, where), scheme == "static")
    if method != "compressed-tensors":
        raise UserError(f"{where}.quant_method: {method!r} is not supported (FP8 checkpoints in the "
                        "compressed-tensors or fp8 form are)")
    if qc.get("format") not in ("float-quantized", "naive-quantized", None):
        raise UserError(f"{where}.format: {qc.get('format')!r} is not supported (float-quantized is)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise UserError(f"{where}.config_groups: expected one group, got {len(groups)}")
    (name, group), = groups.items()
    w = group.get("weights") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") != "tensor":
        raise UserError(f"{where}.config_groups.{name}.weights: only 8-bit float per-tensor weights are supported, "
                        f"got {w.get('num_bits')}-bit {w.get('type')} {w.get('strategy')}")
    a = group.get("input_activations")
    if a and (a.get("type") != "float" or a.get("num_bits") != 8 or a.get("strategy") != "tensor"):
        raise UserError(f"{where}.config_groups.{name}.input_activations: only 8-bit float per-tensor "
                        "activations are supported")
    return Fp8Format(_targets_from_ignore(qc.get("ignore") or [], config, where),
                     bool(a) and not a.get("dynamic", False))


def _targets_from_ignore(ignore: list, config: ModelConfig, where: str) -> tuple[str, ...]:
    def ignored(name: str) -> bool:
        for pat in ignore:
            if pat.startswith("re:") and re.match(pat[3:], name) or pat == name or name.endswith("." + pat):
                return True
        return False

    targets = []
    for t in (*PROJECTIONS, "lm_head"):
        names = [hf_module(t, i) for i in (range(config.n_layers) if t != "lm_head" else [None])]
        flags = {ignored(n) for n in names}
        if len(flags) > 1:
            raise UserError(f"{where}.ignore: {t} is quantised in some layers only; not supported")
        if not flags.pop():
            targets.append(t)
    return tuple(targets)
