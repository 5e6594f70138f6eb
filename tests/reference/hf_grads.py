"""Training-loss gradients from torch autograd through HF transformers' MistralForCausalLM (and PEFT).

Packed rows are expressed the way transformers takes a custom mask: a per-row additive 4-D mask
[B, 1, T, T] (0 where query t may see key s: same segment and s <= t; the float32 minimum
elsewhere), with position_ids restarting at 0 in every document. The loss is the token-weighted
mean of the next-token cross-entropy over trained positions:

    sum_t loss_mask[t] * CE(logits[t], targets[t]) / sum_t loss_mask[t]

The weight maps between HF's torch layout and nemo_jax's parameter tree are written out here from
the two documented layouts (torch Linear weight [out, in]; nemo_jax kernels [*in, *out], see
nemo_jax/model.py's docstring), not taken from nemo_jax.checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

# nemo_jax target -> (sub-tree, HF module under model.layers.{i}, number of kernel input axes)
LINEARS = {
    "q": ("attention", "self_attn.q_proj", 1), "k": ("attention", "self_attn.k_proj", 1),
    "v": ("attention", "self_attn.v_proj", 1), "o": ("attention", "self_attn.o_proj", 2),
    "gate": ("mlp", "mlp.gate_proj", 1), "up": ("mlp", "mlp.up_proj", 1), "down": ("mlp", "mlp.down_proj", 1),
}


def packed_mask(segment_ids: np.ndarray) -> torch.Tensor:
    """Additive float32 [B, 1, T, T]: block-diagonal (one block per segment id) and causal."""
    seg = torch.as_tensor(np.asarray(segment_ids))
    T = seg.shape[-1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask[~allowed] = torch.finfo(torch.float32).min
    return mask[:, None]


def causal_mask(B: int, T: int) -> torch.Tensor:
    """Additive float32 [B, 1, T, T], causal only (documents see each other): for sensitivity checks."""
    return packed_mask(np.ones((B, T), np.int64))


def loss_and_grads(model: torch.nn.Module, batch: dict, mask: torch.Tensor | None = None,
                   loss_mask: np.ndarray | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, {parameter name: gradient}) for every parameter with requires_grad."""
    model.zero_grad(set_to_none=True)
    tokens = torch.as_tensor(np.asarray(batch["tokens"]), dtype=torch.long)
    out = model(input_ids=tokens, attention_mask=packed_mask(batch["segment_ids"]) if mask is None else mask,
                position_ids=torch.as_tensor(np.asarray(batch["positions"]), dtype=torch.long))
    weights = torch.as_tensor(np.asarray(batch["loss_mask"] if loss_mask is None else loss_mask), dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(
        out.logits.float().flatten(0, 1), torch.as_tensor(np.asarray(batch["targets"]), dtype=torch.long).flatten(),
        reduction="none")
    loss = (ce * weights.flatten()).sum() / weights.sum()
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _kernel_to_torch(kernel: np.ndarray, n_in: int) -> np.ndarray:
    """[*in, *out] -> torch Linear weight [out, in]."""
    k = int(np.prod(kernel.shape[:n_in]))
    return np.ascontiguousarray(np.asarray(kernel).reshape(k, -1).T)


def params_from_hf(state: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int,
                   head_dim: int) -> dict:
    """nemo_jax's stacked parameter tree (float32 numpy) from an HF MistralForCausalLM state dict."""
    g = lambda name: state[name].detach().float().numpy()
    D = g("model.embed_tokens.weight").shape[1]
    out_shapes = {"q": (n_heads, head_dim), "k": (n_kv_heads, head_dim), "v": (n_kv_heads, head_dim)}
    layers = {"attention": {}, "mlp": {}}
    for t, (sub, hf, n_in) in LINEARS.items():
        ws = []
        for i in range(n_layers):
            w = g(f"model.layers.{i}.{hf}.weight").T  # [in, out]
            if t in out_shapes:
                w = w.reshape((D,) + out_shapes[t])
            elif t == "o":
                w = w.reshape(n_heads, head_dim, D)
            ws.append(w)
        layers[sub][t] = {"kernel": np.stack(ws)}
    for ours, hf in (("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
        layers[ours] = {"scale": np.stack([g(f"model.layers.{i}.{hf}.weight") for i in range(n_layers)])}
    return {"embed": {"embedding": g("model.embed_tokens.weight")}, "layers": layers,
            "final_norm": {"scale": g("model.norm.weight")}, "lm_head": {"kernel": g("lm_head.weight").T.copy()}}


def grads_to_hf(grads: dict, n_layers: int) -> dict[str, np.ndarray]:
    """A gradient (or parameter) tree in nemo_jax's layout, under HF's names and orientation."""
    out = {"model.embed_tokens.weight": np.asarray(grads["embed"]["embedding"]),
           "model.norm.weight": np.asarray(grads["final_norm"]["scale"]),
           "lm_head.weight": np.asarray(grads["lm_head"]["kernel"]).T}
    layers = grads["layers"]
    for i in range(n_layers):
        for t, (sub, hf, n_in) in LINEARS.items():
            out[f"model.layers.{i}.{hf}.weight"] = _kernel_to_torch(np.asarray(layers[sub][t]["kernel"][i]), n_in)
        out[f"model.layers.{i}.input_layernorm.weight"] = np.asarray(layers["attention_norm"]["scale"][i])
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = np.asarray(layers["ffn_norm"]["scale"][i])
    return out


def adapters_to_peft(adapters: dict, n_layers: int, targets) -> dict[str, np.ndarray]:
    """nemo_jax adapters (a [L, *in, R], b [L, R, *out]) under PEFT's parameter names (adapter
    "default") and orientation: lora_A.weight [R, in], lora_B.weight [out, R]."""
    out = {}
    for t in targets:
        sub, hf, n_in = LINEARS[t]
        a, b = (np.asarray(adapters["layers"][sub][t][x]) for x in "ab")
        for i in range(n_layers):
            prefix = f"base_model.model.model.layers.{i}.{hf}"
            out[f"{prefix}.lora_A.default.weight"] = _kernel_to_torch(a[i], n_in)
            out[f"{prefix}.lora_B.default.weight"] = _kernel_to_torch(b[i], 1)
    return out


def peft_model(model: torch.nn.Module, rank: int, alpha: float, targets, adapters: dict, n_layers: int):
    """PEFT's LoraModel around `model` (frozen), its adapters set to nemo_jax's `adapters`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", use_rslora=False,
                        target_modules=sorted(LINEARS[t][1].split(".")[-1] for t in targets))
    peft = get_peft_model(model, config)
    want = adapters_to_peft(adapters, n_layers, targets)
    params = dict(peft.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(want), sorted(trainable ^ set(want))
    with torch.no_grad():
        for name, value in want.items():
            assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
            params[name].copy_(torch.as_tensor(value))
    return peft
