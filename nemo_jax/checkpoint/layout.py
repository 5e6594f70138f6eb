"""Name tables between our parameter tree and the two published safetensors layouts.

Every leaf of the tree (model.py's docstring) comes from one tensor per layer in HF and Mistral
checkpoints; the layers are stacked on a leading L axis here. Three things differ between layouts:

1. Names. HF: `model.layers.{i}.self_attn.q_proj.weight`; Mistral: `layers.{i}.attention.wq.weight`.
2. Orientation. Torch stores a Linear weight as [out, in]; our kernels are [in..., out...], e.g.
   q_proj [N*H, D] <-> q [D, N, H] and o_proj [D, N*H] <-> o [N, H, D].
3. RoPE pairing. Our rope is rotate-half (HF's convention: dimension j pairs with j + H/2). Mistral's
   wq/wk rows are in interleaved order (j pairs with j + 1), so on import

       hf = permute(mistral, n) = mistral.reshape(n, rows//n//2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)

   with n = N for wq and K for wk, and `unpermute` on export. These are pure index shuffles, so a
   round trip is bit-exact in the same dtype.

Everything here is numpy on one layer's tensor, converted in blocks of rows so that temporaries
stay small; the I/O lives in sources.py and export.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from nemo_jax.checkpoint.host import Scratch, transpose_into
from nemo_jax.config import ModelConfig

Path = tuple[str, ...]  # a leaf's key path in the param tree, e.g. ("layers", "attention", "q", "kernel")


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: Path
    hf: str  # tensor name, with {i} for the layer index when `stacked`
    mistral: str
    stacked: bool
    n_in: int = 1  # leading axes of our kernel that are torch's `in` (0: not a Linear, stored as is)
    rope_heads: str | None = None  # ModelConfig field giving n for the Mistral permutation (wq, wk)

    def name(self, fmt: str, layer: int | None = None) -> str:
        template = getattr(self, fmt)
        return template.format(i=layer) if self.stacked else template

    def key(self) -> str:
        return "/".join(self.path)


LEAVES: tuple[Leaf, ...] = (
    Leaf(("embed", "embedding"), "model.embed_tokens.weight", "tok_embeddings.weight", False, n_in=0),
    Leaf(("layers", "attention", "q", "kernel"), "model.layers.{i}.self_attn.q_proj.weight",
         "layers.{i}.attention.wq.weight", True, rope_heads="n_heads"),
    Leaf(("layers", "attention", "k", "kernel"), "model.layers.{i}.self_attn.k_proj.weight",
         "layers.{i}.attention.wk.weight", True, rope_heads="n_kv_heads"),
    Leaf(("layers", "attention", "v", "kernel"), "model.layers.{i}.self_attn.v_proj.weight",
         "layers.{i}.attention.wv.weight", True),
    Leaf(("layers", "attention", "o", "kernel"), "model.layers.{i}.self_attn.o_proj.weight",
         "layers.{i}.attention.wo.weight", True, n_in=2),
    Leaf(("layers", "mlp", "gate", "kernel"), "model.layers.{i}.mlp.gate_proj.weight",
         "layers.{i}.feed_forward.w1.weight", True),
    Leaf(("layers", "mlp", "up", "kernel"), "model.layers.{i}.mlp.up_proj.weight",
         "layers.{i}.feed_forward.w3.weight", True),
    Leaf(("layers", "mlp", "down", "kernel"), "model.layers.{i}.mlp.down_proj.weight",
         "layers.{i}.feed_forward.w2.weight", True),
    Leaf(("layers", "attention_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
         "layers.{i}.attention_norm.weight", True, n_in=0),
    Leaf(("layers", "ffn_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
         "layers.{i}.ffn_norm.weight", True, n_in=0),
    Leaf(("final_norm", "scale"), "model.norm.weight", "norm.weight", False, n_in=0),
    Leaf(("lm_head", "kernel"), "lm_head.weight", "output.weight", False),
)


def leaf_shape(leaf: Leaf, c: ModelConfig) -> tuple[int, ...]:
    """Our shape of the leaf, without the L axis for stacked leaves."""
    D, N, K, H, F, V = c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size
    return {
        "embed/embedding": (V, D),
        "layers/attention/q/kernel": (D, N, H),
        "layers/attention/k/kernel": (D, K, H),
        "layers/attention/v/kernel": (D, K, H),
        "layers/attention/o/kernel": (N, H, D),
        "layers/mlp/gate/kernel": (D, F),
        "layers/mlp/up/kernel": (D, F),
        "layers/mlp/down/kernel": (F, D),
        "layers/attention_norm/scale": (D,),
        "layers/ffn_norm/scale": (D,),
        "final_norm/scale": (D,),
        "lm_head/kernel": (D, V),
    }[leaf.key()]


def stacked_shape(leaf: Leaf, c: ModelConfig) -> tuple[int, ...]:
    return ((c.n_layers,) if leaf.stacked else ()) + leaf_shape(leaf, c)


def source_shape(leaf: Leaf, c: ModelConfig) -> tuple[int, ...]:
    """The shape of one layer's tensor in the HF / Mistral files (the same in both)."""
    shape = leaf_shape(leaf, c)
    if leaf.n_in == 0:
        return shape
    return (math.prod(shape[leaf.n_in:]), math.prod(shape[:leaf.n_in]))  # torch Linear: [out, in]


def tensor_names(fmt: str, c: ModelConfig) -> list[tuple[Leaf, int | None, str]]:
    """Every tensor of a checkpoint in `fmt`: (leaf, layer or None, name), grouped by leaf."""
    return [(leaf, i, leaf.name(fmt, i)) for leaf in LEAVES
            for i in (range(c.n_layers) if leaf.stacked else [None])]


def permute(w: np.ndarray, n: int) -> np.ndarray:
    """Mistral (interleaved rope) rows -> HF (rotate-half) rows, for n heads."""
    rows, cols = w.shape
    return w.reshape(n, rows // n // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def unpermute(w: np.ndarray, n: int) -> np.ndarray:
    """HF rows -> Mistral rows (the inverse of `permute`)."""
    rows, cols = w.shape
    return w.reshape(n, 2, rows // n // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# Large matrices are converted in blocks of rows of the stored tensor, so the temporaries stay
# small whatever the tensor (the 1.3 GB lm_head of NeMo included).
BLOCK_BYTES = 8 << 20


def _block_rows(leaf: Leaf, c: ModelConfig, cols: int, itemsize: int) -> int:
    """Rows per block: about BLOCK_BYTES, a multiple of 8 (transpose_into's fast path) and of
    head_dim where the rope permutation needs whole heads."""
    unit = math.lcm(8, c.head_dim) if leaf.rope_heads else 8
    return max(unit, BLOCK_BYTES // (cols * itemsize) // unit * unit)


def to_ours(leaf: Leaf, fmt: str, read_rows: Callable[[int, int], np.ndarray], c: ModelConfig, out: np.ndarray,
            scratch: Scratch) -> None:
    """Fill `out` (one layer, our layout; any float dtype: casts) from the tensor stored in `fmt`,
    which `read_rows(r0, r1)` reads a block of rows of."""
    rows = source_shape(leaf, c)[0]
    if leaf.n_in == 0:
        out[...] = read_rows(0, rows)
        return
    cols = source_shape(leaf, c)[1]
    assert out.flags.c_contiguous  # so that the reshape below is a view of it
    out2 = out.reshape(cols, rows)
    step = _block_rows(leaf, c, cols, out.dtype.itemsize)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = read_rows(r0, r1)
        if fmt == "mistral" and leaf.rope_heads:
            w = _rope_rows(w, (r1 - r0) // c.head_dim, scratch, to_hf=True)
        transpose_into(out2[:, r0:r1], w, scratch)


def from_ours(leaf: Leaf, fmt: str, x: np.ndarray, c: ModelConfig, scratch: Scratch,
              block: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """One layer of our leaf -> the tensor stored in `fmt`, as consecutive C-contiguous blocks of rows.

    Without `block` each block is valid until the next is produced (they share scratch memory);
    with it, each converted block is written into a fresh `block(shape, dtype)` (e.g. a background
    writer's buffers). A leaf stored as is comes out as `x` itself (a view, no copy)."""
    if leaf.n_in == 0:
        yield x if x.flags.c_contiguous else np.ascontiguousarray(x)
        return
    rows, cols = source_shape(leaf, c)
    x2 = x.reshape(cols, rows)
    step = _block_rows(leaf, c, cols, x.dtype.itemsize)
    rope = fmt == "mistral" and leaf.rope_heads
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if block is None or rope:
            w = scratch.get((r1 - r0, cols), x.dtype, "rows")
        else:
            w = block((r1 - r0, cols), x.dtype)
        transpose_into(w, x2[:, r0:r1], scratch)
        if rope:
            w = _rope_rows(w, (r1 - r0) // c.head_dim, scratch, to_hf=False,
                           out=None if block is None else block(w.shape, w.dtype))
        yield w


def _rope_rows(w: np.ndarray, n: int, scratch: Scratch, to_hf: bool, out: np.ndarray | None = None) -> np.ndarray:
    """`permute` (to_hf) or `unpermute` of n whole heads' rows, written straight into `out` or a scratch buffer."""
    rows, cols = w.shape
    if out is None:
        out = scratch.get(w.shape, w.dtype, "rope")
    interleaved, halves = (n, rows // n // 2, 2, cols), (n, 2, rows // n // 2, cols)
    src, dst = (interleaved, halves) if to_hf else (halves, interleaved)
    out.reshape(dst)[...] = w.reshape(src).transpose(0, 2, 1, 3)
    return out


def get_path(tree: dict, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def nest(flat: dict[Path, object]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out
