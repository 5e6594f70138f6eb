"""LoRA: low-rank adapters on the attention and MLP projections.

A frozen projection W (in -> out) gets a trainable update (alpha / r) * A B, with A: in -> r and
B: r -> out. B starts at zero, so at step 0 the adapted model *is* the base model; A starts random
so the first gradient on B is not zero. Only A and B are trained: the base stays in its own
`params` collection with no gradient and no optimizer state, which is what lets 12B fit on one GPU
(Adam's two moments would otherwise triple the weights' memory).

Adapters live in the `lora` collection with the base tree's layout, stacked over layers:
    lora/layers/attention/q/{a: [L, D, R], b: [L, R, N, H]}, ... lora/layers/mlp/down/{a: [L, F, R], b: [L, R, D]}

Merging folds (alpha / r) * A B into W for export (HF/Mistral safetensors). PEFT export writes the
adapters in HF PEFT's names and orientation (torch Linear: lora_A.weight [r, in], lora_B.weight
[out, r]) so `PeftModel.from_pretrained` loads them onto the HF export of the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import model
from nemo_jax.config import PROJECTIONS, ModelConfig



def init_lora(config: ModelConfig, spec: model.LoraSpec, rng) -> dict:
    """Adapters only, in float32 (small, and bf16 adapters train poorly). The base params' random
    init is dead code under jit and never runs."""
    lora = jax.jit(lambda r: model.init_params(config, r, spec)["lora"])(rng)
    return jax.tree.map(lambda x: x.astype(jnp.float32), lora)


def lora_logical_axes(config: ModelConfig, spec: model.LoraSpec):
    return model.logical_axes(config, spec)["lora"]


def delta(a, b, scale):
    """(scale * A B) with A: [L, *in, R], B: [L, R, *out] -> [L, *in, *out], in float32."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    L, R = a.shape[0], a.shape[-1]
    in_shape, out_shape = a.shape[1:-1], b.shape[2:]
    d = jnp.einsum("LIR,LRO->LIO", a.reshape(L, -1, R), b.reshape(L, R, -1))
    return (scale * d).reshape((L,) + in_shape + out_shape)


def merge(params: dict, lora_params: dict, spec: model.LoraSpec) -> dict:
    """Base params with each adapter folded in (W + (alpha/r) A B), in the base's dtype."""
    layers = dict(params["layers"])
    for target in spec.targets:
        sub, _ = PROJECTIONS[target]
        ab = lora_params["layers"][sub][target]
        w = layers[sub][target]["kernel"]
        merged = (jnp.asarray(w, jnp.float32) + delta(ab["a"], ab["b"], spec.scale)).astype(w.dtype)
        layers[sub] = {**layers[sub], target: {"kernel": merged}}
    return {**params, "layers": layers}


def to_peft_tensors(lora_params: dict, spec: model.LoraSpec) -> dict[str, np.ndarray]:
    """PEFT's tensor names and orientation, float32 numpy."""
    out = {}
    for target in spec.targets:
        sub, hf = PROJECTIONS[target]
        a = np.asarray(lora_params["layers"][sub][target]["a"], np.float32)  # [L, *in, R]
        b = np.asarray(lora_params["layers"][sub][target]["b"], np.float32)  # [L, R, *out]
        L, R = a.shape[0], a.shape[-1]
        for i in range(L):
            prefix = f"base_model.model.model.layers.{i}.{hf}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, R).T)  # [R, in]
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(R, -1).T)  # [out, R]
    return out


def peft_adapter_config(spec: model.LoraSpec, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(PROJECTIONS[t][1].split(".")[-1] for t in spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }


def export_peft(out_dir: Path, lora_params: dict, spec: model.LoraSpec, base_model: str) -> None:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_peft_tensors(lora_params, spec), str(out_dir / "adapter_model.safetensors"))
    with open(out_dir / "adapter_config.json", "w") as f:
        json.dump(peft_adapter_config(spec, base_model), f, indent=2)
