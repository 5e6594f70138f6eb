"""Reference checkpoints and logits from HF transformers' MistralForCausalLM (code nobody here wrote).

Also a Mistral consolidated writer that shares no code with nemo_jax.checkpoint: names from the
published tensor list, the rope row order from the permutation formula Mistral and HF document,
applied to row indices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM


def save_random_hf(path: Path, *, seed: int = 0, dtype=torch.float32, max_shard_size: str | None = None,
                   vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1e6) -> Path:
    """A random MistralForCausalLM saved with save_pretrained; weights scaled so every part matters."""
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, rope_theta=rope_theta,
        max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # Linear [out, in]: unit-variance activations
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size or "5GB")
    return Path(path)


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of the checkpoint at `path` for int tokens [B, T]."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert isinstance(model, MistralForCausalLM)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory (single file or sharded)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def interleaved_rows(rows: int, n_heads: int) -> np.ndarray:
    """Row r of the HF (rotate-half) matrix is row order[r] of the Mistral (interleaved) one.

    From the documented formula hf = w.reshape(n, rows//n//2, 2, cols).transpose(0, 2, 1, 3)
    .reshape(rows, cols), applied to the row indices of w.
    """
    idx = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1).reshape(rows)
    return idx


_NAMES = {  # HF suffix -> Mistral suffix, from the published tensor lists
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_mistral_from_hf(hf_dir: Path, out: Path) -> Path:
    """The same weights in Mistral's consolidated layout: params.json + consolidated.safetensors."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {}
    for name, t in hf_state(hf_dir).items():
        if name == "model.embed_tokens.weight":
            tensors["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            tensors["norm.weight"] = t
        elif name == "lm_head.weight":
            tensors["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            heads = {"self_attn.q_proj.weight": n, "self_attn.k_proj.weight": k}.get(rest)
            if heads:
                mistral = torch.empty_like(t)
                mistral[torch.as_tensor(interleaved_rows(t.shape[0], heads))] = t
                t = mistral
            tensors[f"layers.{layer}.{_NAMES[rest]}"] = t.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "consolidated.safetensors")
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "head_dim": cfg["head_dim"],
              "hidden_dim": cfg["intermediate_size"], "n_heads": n, "n_kv_heads": k,
              "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "rope_theta": theta}
    (out / "params.json").write_text(json.dumps(params))
    return out
