"""ModelConfig: the architecture of a Mistral/NeMo decoder, its presets, and parsing of the two
published config formats (HF `config.json`, Mistral `params.json`).

NeMo's head_dim (128) is NOT dim / n_heads (5120 / 32 = 160); every shape here uses head_dim
explicitly, which is what converters that derive it from dim get wrong.

Parsing is strict on purpose: a field that would change the maths (a sliding window, tied
embeddings, rope scaling, biases, MoE, ...) is refused with an error naming the file and the
field, never silently ignored; fields known not to affect the forward pass are skipped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nemo_jax.errors import UserError

# Documents packed into one row, at most. The GPU attention kernel (cuDNN's packed layout,
# attention.py) takes each row's documents as a fixed-size table of offsets and lengths: one entry
# per contiguous run of segment ids, padding included, so this + 1 entries. 63 documents fill an
# 8192-token row at 130 tokens each; the table costs 4 bytes x heads x T per entry of softmax
# statistics (64 entries, 32 heads, T = 8192: 64 MiB per layer in flight).
MAX_DOCUMENTS_PER_ROW = 63

DTYPES = ("float32", "bfloat16")

# The one table of what LoRA, FP8 and NF4 target: each projection's block in the layer tree
# (params["layers"][block][target]["kernel"], model.py) and its module under model.layers.{i} in the
# HF layout (PEFT's target_modules, compressed-tensors' module names). FP8 can also target lm_head.
PROJECTIONS = {
    "q": ("attention", "self_attn.q_proj"),
    "k": ("attention", "self_attn.k_proj"),
    "v": ("attention", "self_attn.v_proj"),
    "o": ("attention", "self_attn.o_proj"),
    "gate": ("mlp", "mlp.gate_proj"),
    "up": ("mlp", "mlp.up_proj"),
    "down": ("mlp", "mlp.down_proj"),
}


def block_of(target: str) -> str:
    """"attention" or "mlp": the layer sub-tree holding a projection."""
    return PROJECTIONS[target][0]


def kernel_path(target: str) -> tuple[str, ...]:
    """The param-tree path of a target's kernel (lm_head included)."""
    return ("lm_head", "kernel") if target == "lm_head" else ("layers", block_of(target), target, "kernel")


def target_at(path: tuple[str, ...]) -> str | None:
    """The target whose kernel sits at `path` (a checkpoint leaf's path), or None."""
    return _TARGET_AT.get(tuple(path))


def hf_module(target: str, layer: int | None) -> str:
    """A target's module name in HF checkpoints (`model.layers.3.self_attn.q_proj`, `lm_head`)."""
    return "lm_head" if target == "lm_head" else f"model.layers.{layer}.{PROJECTIONS[target][1]}"


_TARGET_AT = {kernel_path(t): t for t in (*PROJECTIONS, "lm_head")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 131072  # V
    dim: int = 5120  # D
    n_layers: int = 40  # L
    n_heads: int = 32  # N
    n_kv_heads: int = 8  # K
    head_dim: int = 128  # H
    hidden_dim: int = 14336  # F
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 131072
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"model.{f}: expected a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise UserError(f"model.{f}: expected one of {', '.join(DTYPES)}, got {getattr(self, f)!r}")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown model config field(s) {unknown}")
        return cls(**d)

    @property
    def num_params(self) -> int:
        D, F, V, L = self.dim, self.hidden_dim, self.vocab_size, self.n_layers
        attn = D * self.n_heads * self.head_dim * 2 + D * self.n_kv_heads * self.head_dim * 2
        return 2 * V * D + D + L * (attn + 3 * D * F + 2 * D)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        6 * (matmul params) plus the causal attention scores/values, as in the PaLM appendix.
        """
        D, L = self.dim, self.n_layers
        matmul_params = self.num_params - self.vocab_size * D - D - L * 2 * D  # no embedding lookup, norms
        attn = 6 * L * self.n_heads * self.head_dim * seq_len  # 12*L*N*H*T/2 for a causal mask
        return 6 * matmul_params + attn


PRESETS: dict[str, ModelConfig] = {
    "mistral-nemo-12b": ModelConfig(),
    # NeMo's shape at toy size (head_dim != dim / n_heads, GQA). The vocab keeps Tekken's first 8192 ids
    # (1000 control tokens + the 7192 most frequent merges; the tokenizer is cut to match, as Tekken
    # files with a smaller default vocab are): the 131072-way LM head would be 95% of a CPU step.
    # 8 heads of 24 rather than 4 of 48 (the same FLOPs) and RoPE theta 1e4 for its 4096 positions: a
    # copy task's held-out loss after 300 steps fell from 1.20 (4 x 48, theta 1e6) to 1.05; copying
    # arguments out of the request is what function calling needs (configs/demo_base.yaml).
    "demo": ModelConfig(vocab_size=8192, dim=128, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=24, hidden_dim=384,
                        rope_theta=1e4, max_seq_len=4096),
    "tiny": ModelConfig(vocab_size=1280, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=128,
                        max_seq_len=2048),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# --- HF config.json -----------------------------------------------------------------------------

# Fields that do not change the forward pass (generation defaults, bookkeeping, training-only knobs).
_HF_IGNORED = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "attention_dropout", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "max_position_embeddings", "hidden_act",
    "sliding_window", "tie_word_embeddings", "rope_scaling", "rope_parameters", "rope_theta", "attention_bias",
    "mlp_bias", "use_sliding_window", "max_window_layers", "layer_types", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "architectures", "quantization_config", "head_dim",
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "rms_norm_eps", "vocab_size", "is_decoder", "pruned_heads", "torchscript", "use_return_dict",
}


def _refuse(source: str, field: str, value, why: str):
    raise UserError(f"{source}: unsupported {field}={value!r} ({why})")


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF MistralForCausalLM config (4.x top-level rope_theta or 5.x rope_parameters)."""
    arch = cfg.get("architectures") or ["MistralForCausalLM"]
    if cfg.get("model_type", "mistral") != "mistral" or arch != ["MistralForCausalLM"]:
        _refuse(source, "architecture", cfg.get("model_type") or arch, "only MistralForCausalLM is supported")
    if cfg.get("sliding_window") is not None or cfg.get("use_sliding_window"):
        _refuse(source, "sliding_window", cfg.get("sliding_window"), "sliding-window attention is not implemented")
    if cfg.get("tie_word_embeddings", False):
        _refuse(source, "tie_word_embeddings", True, "NeMo has an untied LM head")
    if cfg.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", cfg["hidden_act"], "only SwiGLU with silu is implemented")
    for f in ("attention_bias", "mlp_bias"):
        if cfg.get(f):
            _refuse(source, f, cfg[f], "biases are not implemented")
    if cfg.get("rope_scaling") not in (None, {}):
        _refuse(source, "rope_scaling", cfg["rope_scaling"], "only default rope is implemented")
    rope = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if rope is not None:
        if rope.get("rope_type", "default") != "default":
            _refuse(source, "rope_parameters.rope_type", rope.get("rope_type"), "only default rope is implemented")
        theta = rope.get("rope_theta", theta)
    if theta is None:
        theta = 10000.0  # transformers' MistralConfig default
    # quantization_config (FP8 checkpoints) describes the stored tensors, not the model's maths: the
    # safetensors reader checks and dequantises it (checkpoint/fp8_io.py).
    unknown = sorted(k for k in cfg if k not in _HF_IGNORED)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown}; refusing rather than ignoring what may change the model")
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim")
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim) if head_dim else dim // n_heads,
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_seq_len=int(cfg.get("max_position_embeddings", 131072)),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing required field {e.args[0]!r}") from None


def to_hf_config(c: ModelConfig, torch_dtype: str) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.hidden_dim,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_seq_len,
        "hidden_act": "silu",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }


# --- Mistral params.json --------------------------------------------------------------------------

_MISTRAL_IGNORED = {"max_seq_len", "max_position_embeddings", "model_type", "_version"}


def from_params_json(p: dict, source: str = "params.json") -> ModelConfig:
    for f, why in (("moe", "mixture-of-experts is not implemented"),
                   ("vision_encoder", "vision encoders are not implemented"),
                   ("lora", "params.json carries a LoRA section; merge it first"),
                   ("quantization", "quantised checkpoints are not supported yet")):
        if p.get(f):
            _refuse(source, f, p[f], why)
    if p.get("sliding_window") is not None:
        _refuse(source, "sliding_window", p["sliding_window"], "sliding-window attention is not implemented")
    if p.get("use_biases"):
        _refuse(source, "use_biases", True, "biases are not implemented")
    if p.get("tied_embeddings"):
        _refuse(source, "tied_embeddings", True, "NeMo has an untied LM head")
    known = {"dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size",
             "rope_theta", "moe", "vision_encoder", "lora", "quantization", "sliding_window", "use_biases",
             "tied_embeddings"} | _MISTRAL_IGNORED
    unknown = sorted(set(p) - known)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {unknown}; refusing rather than ignoring what may change the model")
    try:
        n_heads = int(p["n_heads"])
        return ModelConfig(
            vocab_size=int(p["vocab_size"]),
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(p.get("n_kv_heads", n_heads)),
            head_dim=int(p.get("head_dim") or p["dim"] // n_heads),
            hidden_dim=int(p["hidden_dim"]),
            norm_eps=float(p["norm_eps"]),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            max_seq_len=int(p.get("max_seq_len", p.get("max_position_embeddings", 131072))),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing required field {e.args[0]!r}") from None


def to_params_json(c: ModelConfig) -> dict:
    return {
        "dim": c.dim,
        "n_layers": c.n_layers,
        "head_dim": c.head_dim,
        "hidden_dim": c.hidden_dim,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "norm_eps": c.norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
    }


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
