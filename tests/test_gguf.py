"""`export --format gguf` (nemo_jax/checkpoint/gguf_export.py), read back with gguf-py's own reader:
llama.cpp's tensor names and shapes, q/k rows as llama.cpp's converter permutes HF weights (the formula
applied here to our HF export), bf16/f16 bit-exact and q8_0 within its rounding after gguf's own
dequantisation, NeMo's metadata (head_dim 128), and the Tekken vocabulary: a byte-level BPE built from
the file's tokens and merges (HF tokenizers) tokenizes text exactly as Tekken does."""

import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from gguf.quants import dequantize
from safetensors.numpy import load_file

from nemo_jax import load_tokenizer
from nemo_jax.checkpoint import ExportOptions, ParamsSource, export_checkpoint
from nemo_jax.checkpoint.gguf_export import byte_alphabet, write_model_metadata
from nemo_jax.config import preset
from nemo_jax.convert import main as convert_main
from nemo_jax.model import abstract_variables

CONFIG = preset("tiny").replace(hidden_dim=112)  # down_proj rows of 112 do not split into q8_0 blocks of 32: f16
TEXTS = ["Bonjour, comment ça va ? 21 °C à Lyon.", "def f(x):\n    return x ** 2  # 平方", "Привет, мир!  🌍🚀",
         "   leading spaces\tand\ttabs\n\n\nnewlines", "日本語のテキストと English mixed 12345.678"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract_variables(CONFIG)["params"])
    source = ParamsSource(CONFIG, params, root / "mem")
    export_checkpoint(source, root / "hf", "hf")  # the reference layout the permutation is applied to
    out = {}
    for t in ("bf16", "f16", "q8_0"):
        export_checkpoint(source, root / t, "gguf", ExportOptions(gguf_type=t))
        out[t] = gguf.GGUFReader(root / t / "model.gguf")
    hf = {}
    for f in sorted((root / "hf").glob("*.safetensors")):
        hf.update(load_file(f))
    return out, hf


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))] if f.types[-1] == gguf.GGUFValueType.STRING else \
            [int(f.parts[i][0]) for i in f.data]
    return f.contents()


def hf_to_llama_cpp(w, n_heads):
    """The q/k row order llama.cpp's converter gives HF (rotate-half) weights: within each head, the
    halves' rows interleaved (row j of the first half, then row j of the second)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def expected_tensors(hf):
    c = CONFIG
    names = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
             "output.weight": hf["lm_head.weight"]}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        names.update({
            f"blk.{i}.attn_q.weight": hf_to_llama_cpp(hf[p + "self_attn.q_proj.weight"], c.n_heads),
            f"blk.{i}.attn_k.weight": hf_to_llama_cpp(hf[p + "self_attn.k_proj.weight"], c.n_kv_heads),
            f"blk.{i}.attn_v.weight": hf[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": hf[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": hf[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": hf[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": hf[p + "mlp.down_proj.weight"],
            f"blk.{i}.attn_norm.weight": hf[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    return names


def bf16(x):
    return np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16).astype(jax.numpy.float32))


@pytest.mark.parametrize("gguf_type", ["bf16", "f16", "q8_0"])
def test_tensors_are_llama_cpps(exported, gguf_type):
    readers, hf = exported
    reader, want = readers[gguf_type], expected_tensors(hf)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, ref in want.items():
        t = got[name]
        assert list(t.shape) == list(reversed(ref.shape)), name  # GGUF lists ne0 (= in) first
        x = dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if ref.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(x, ref)
        elif gguf_type == "bf16":
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            np.testing.assert_array_equal(x, bf16(ref))
        elif gguf_type == "f16":
            np.testing.assert_array_equal(x, ref.astype(np.float16).astype(np.float32))
        elif ref.shape[1] % 32:  # q8_0 blocks do not fit the rows: f16, as llama.cpp's converter falls back
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and name.endswith("ffn_down.weight")
            np.testing.assert_array_equal(x, ref.astype(np.float16).astype(np.float32))
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            blocks = ref.reshape(-1, 32)  # per 32 values: round(x / step) * step, step = amax / 127 held in f16
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(x.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all(), name


def test_nemo_metadata_as_llama_cpp_reads_it(exported, tmp_path):
    reader = exported[0]["q8_0"]
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field(reader, "llama.attention.key_length") == CONFIG.head_dim
    # the 12B architecture, written by the same function: head_dim 128 given explicitly (5120 / 32 = 160)
    w = gguf.GGUFWriter(tmp_path / "meta.gguf", "llama")
    write_model_metadata(w, preset("mistral-nemo-12b"), "bf16", "Mistral-Nemo-Base-2407")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    meta = gguf.GGUFReader(tmp_path / "meta.gguf")
    assert {k: field(meta, k) for k in meta.fields if k.startswith("llama.")} == {
        "llama.vocab_size": 131072, "llama.context_length": 131072, "llama.embedding_length": 5120,
        "llama.feed_forward_length": 14336, "llama.block_count": 40, "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8, "llama.attention.key_length": 128, "llama.attention.value_length": 128,
        "llama.rope.dimension_count": 128, "llama.rope.freq_base": 1e6, "llama.attention.layer_norm_rms_epsilon":
        pytest.approx(1e-5)}


def test_tekken_vocabulary_tokenizes_as_tekken(exported):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    reader = exported[0]["bf16"]
    tok = load_tokenizer(vocab_size=CONFIG.vocab_size)
    tokens, types, merges = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "tekken"
    assert len(tokens) == CONFIG.vocab_size and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:1000] == [int(gguf.TokenType.CONTROL)] * 1000 and set(types[1000:]) == {int(gguf.TokenType.NORMAL)}
    assert [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    # a byte-level BPE from the file alone must reproduce Tekken (what llama.cpp's gpt2 vocab type runs)
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok._enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in TEXTS + [Path(__file__).read_text()[:3000]]:
        assert bpe.encode(text, add_special_tokens=False).ids == tok.encode(text), text[:40]
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"


def test_cli_exports_gguf(exported, tmp_path, capsys):
    readers, _ = exported
    src = tmp_path / "ckpt"
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), abstract_variables(CONFIG)["params"])
    export_checkpoint(ParamsSource(CONFIG, params, tmp_path), src, "mistral")
    convert_main(["export", str(src), str(tmp_path / "out"), "--format", "gguf", "--gguf-type", "q8_0",
                  "--no-progress"])
    assert "wrote" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert len(reader.tensors) == len(readers["q8_0"].tensors)
    json.dumps({k: 0 for k in reader.fields})  # every key a plain string
