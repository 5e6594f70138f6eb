"""`export --format gguf`: one GGUF file for llama.cpp and Ollama (`OUT/model.gguf`).

NeMo is written the way llama.cpp's own converter (convert_hf_to_gguf.py) writes the published HF
repo, so llama.cpp runs it with its stock `llama` graph:

* architecture `llama` with NeMo's head_dim spelled out: `llama.attention.key_length` =
  `value_length` = `rope.dimension_count` = 128 (llama.cpp would otherwise take 5120 / 32 = 160);
* tensors `token_embd`, `blk.N.attn_{q,k,v,output,norm}`, `blk.N.ffn_{gate,up,down,norm}`,
  `output_norm`, `output`, each stored [out, in] as torch does (GGUF lists the dims reversed). q and k
  rows are in the interleaved rope order of llama.cpp's "normal" rope (pairs 2j, 2j + 1), which is
  Mistral's consolidated order: what the converter's `permute` makes of HF's rotate-half rows;
* the Tekken tokenizer as a GPT-2 style byte-level BPE (`tokenizer.ggml.model` "gpt2", `pre` "tekken",
  whose split regex llama.cpp has built in): the control tokens, then every BPE token's bytes in
  GPT-2's printable byte alphabet, with merges rebuilt from the ranks (below), `<s>` added in front.

Weights are bf16, f16 or q8_0 (`--gguf-type`); norms stay f32, as the converter keeps them, and a
matrix whose rows do not split into q8_0's 32-value blocks falls back to f16, as it does too. The
file is streamed: the header and tensor table are computed from the config, then each layer's
tensor is converted and written, one stacked leaf in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nemo_jax.checkpoint import layout
from nemo_jax.checkpoint.host import Scratch
from nemo_jax.checkpoint.sources import Source, progress_bar
from nemo_jax.config import ModelConfig
from nemo_jax.errors import UserError

GGUF_TYPES = ("bf16", "f16", "q8_0")
FILE_NAME = "model.gguf"

# our leaf -> llama.cpp's tensor (gguf-py's MODEL_TENSOR names, `blk.{bid}.` for layer tensors)
_TENSORS = {
    "embed/embedding": "TOKEN_EMBD", "layers/attention/q/kernel": "ATTN_Q", "layers/attention/k/kernel": "ATTN_K",
    "layers/attention/v/kernel": "ATTN_V", "layers/attention/o/kernel": "ATTN_OUT",
    "layers/mlp/gate/kernel": "FFN_GATE", "layers/mlp/up/kernel": "FFN_UP", "layers/mlp/down/kernel": "FFN_DOWN",
    "layers/attention_norm/scale": "ATTN_NORM", "layers/ffn_norm/scale": "FFN_NORM",
    "final_norm/scale": "OUTPUT_NORM", "lm_head/kernel": "OUTPUT",
}


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a pinned dependency
        raise UserError("--format gguf needs the gguf package (pip install gguf)") from None
    return gguf


def tensor_name(leaf: layout.Leaf, layer: int | None) -> str:
    gguf = _gguf()
    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, _TENSORS[leaf.key()])].format(bid=layer) + ".weight"


def tensor_type(leaf: layout.Leaf, shape: tuple[int, ...], gguf_type: str):
    """The GGML type a tensor is stored in: f32 for norms, else `gguf_type` (q8_0 -> f16 if rows don't split)."""
    q = _gguf().GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if gguf_type == "q8_0" and shape[-1] % 32:
        return q.F16
    return {"bf16": q.BF16, "f16": q.F16, "q8_0": q.Q8_0}[gguf_type]


def write_model_metadata(w, c: ModelConfig, gguf_type: str, name: str) -> None:
    gguf = _gguf()
    w.add_name(name)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)  # NeMo: 128, not dim / n_heads = 160
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> one printable character. Printable Latin-1 bytes are
    themselves; the 68 others (controls, space, ...) become U+0100 + their order among them."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, n = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + n))
            n += 1
    return out


def tokenizer_vocab(tok) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a Tekken tokenizer as a byte-level BPE.

    Tekken (tiktoken) merges, at every step, the adjacent pair whose concatenation has the lowest
    rank. A byte-level BPE applies listed merges by their position instead, so every way of splitting
    a token into two tokens is listed, at the token's rank: whichever pair of parts appears, it
    merges exactly when tiktoken would."""
    gguf = _gguf()
    alphabet = byte_alphabet()
    n_special = tok.num_special_tokens
    pieces = [tok.id_to_bytes(i) for i in range(n_special, tok.vocab_size)]
    text = ["".join(alphabet[b] for b in p) for p in pieces]
    rank = {p: r for r, p in enumerate(pieces)}
    merges = []
    for r, p in enumerate(pieces):
        splits = [(rank[p[:j]], rank[p[j:]]) for j in range(1, len(p)) if p[:j] in rank and p[j:] in rank]
        merges += [f"{text[a]} {text[b]}" for a, b in sorted(splits)]
    tokens = [tok.id_to_bytes(i).decode() for i in range(n_special)] + text
    types = [gguf.TokenType.CONTROL] * n_special + [gguf.TokenType.NORMAL] * len(pieces)
    return tokens, [int(t) for t in types], merges


def write_tokenizer_metadata(w, tok) -> None:
    tokens, types, merges = tokenizer_vocab(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _tokenizer_for(source: Source, opts, vocab_size: int):
    from nemo_jax.tokenizer import load_tokenizer

    path = opts.tokenizer
    if path is None and (Path(source.path) / "tekken.json").is_file():  # e.g. a Hub snapshot's own
        path = Path(source.path) / "tekken.json"
    return load_tokenizer(path, vocab_size=vocab_size)


def _model_name(path: Path) -> str:
    """general.name: the directory's name, or a Hub snapshot's repo name (not its commit)."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return path.name or "nemo"


def export_gguf(source: Source, out: Path, opts) -> None:
    """OUT/model.gguf from any checkpoint (a LoRA run merged)."""
    gguf = _gguf()
    gguf_type = getattr(opts, "gguf_type", "bf16")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    config = source.config_for(None if source.stored_dtype in ("float32", "bfloat16") else "float32")
    tok = _tokenizer_for(source, opts, config.vocab_size)
    w = gguf.GGUFWriter(out / FILE_NAME, "llama")
    write_model_metadata(w, config, gguf_type, _model_name(Path(source.path)))
    write_tokenizer_metadata(w, tok)
    tensors = layout.tensor_names("mistral", config)  # Mistral's rows: llama.cpp's rope order
    for leaf, i, _ in tensors:
        shape = layout.source_shape(leaf, config)
        qtype = tensor_type(leaf, shape, gguf_type)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        w.add_tensor_info(tensor_name(leaf, i), shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    scratch, current, value = Scratch(), None, None
    total = sum(int(np.prod(layout.source_shape(leaf, config))) * 4 for leaf, _, _ in tensors)
    with progress_bar(total, opts.progress, "export gguf") as bar:
        for leaf, i, _ in tensors:
            if leaf is not current:  # each stacked leaf is read once, in its stored dtype
                current, value = leaf, None
                value = source.read_leaf(leaf, config.param_dtype)
                bar.set_postfix_str(leaf.key())
            x = value[i] if leaf.stacked else value
            shape = layout.source_shape(leaf, config)
            qtype = tensor_type(leaf, shape, gguf_type)
            blocks = [gguf.quants.quantize(np.asarray(b, np.float32), qtype)  # rows: q8_0 blocks never span two
                      for b in layout.from_ours(leaf, "mistral", x, config, scratch)]
            w.write_tensor_data(np.concatenate(blocks) if len(blocks) > 1 else blocks[0])
            bar.update(int(np.prod(shape)) * 4)
    w.close()
