"""The frozen LoRA base stored quantised (`lora.quantize_base`): NF4 (nf4.py) or INT8 (int8.py).

The formats differ only in their per-kernel math; this module holds what they share: which kernels
are quantised (the LoRA targets, config.PROJECTIONS), the quantised tree's abstract shapes and
logical axes, quantising a params tree, restoring a checkpoint leaf by leaf with the targeted kernels
quantised on the devices, and reading checkpoints that bitsandbytes already quantised (transformers'
`load_in_4bit` / `load_in_8bit` saves), whose tensors are our layout and load as a copy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import int8, nf4
from nemo_jax.config import block_of, kernel_path, target_at
from nemo_jax.errors import UserError

KINDS = ("nf4", "int8")
N_IN = {"o": 2}  # o's kernel [N, H, D] has two input axes; the others one


@dataclasses.dataclass(frozen=True)
class BaseQuant:
    """How the frozen base's targeted kernels are stored."""

    kind: str  # "nf4" | "int8"
    double_quant: bool = False  # NF4's absmaxes quantised once more (nf4.py); INT8 has none

    def __post_init__(self):
        if self.kind not in KINDS or (self.double_quant and self.kind != "nf4"):
            raise ValueError(f"no quantised base {self}")

    def quantize_kernel(self, kernel, n_in: int) -> dict:
        """A stacked kernel [L, *in, *out] quantised layer by layer."""
        if self.kind == "nf4":
            return nf4.quantize_kernel(kernel, n_in, self.double_quant)
        return int8.quantize_kernel(kernel, n_in)

    def shapes(self, kernel, n_in: int) -> dict:
        """The quantised ShapeDtypeStructs of an (abstract) stacked kernel [L, *in, *out]."""
        n_layers, layer = kernel.shape[0], kernel.shape[1:]
        if self.kind == "nf4":
            return nf4.quantized_shapes(math.prod(layer), n_layers, self.double_quant)
        return int8.quantized_shapes(math.prod(layer[:n_in]), math.prod(layer[n_in:]), n_layers)

    def axes(self) -> dict:
        """Each quantised leaf's logical axes."""
        if self.kind == "int8":
            return int8.LOGICAL_AXES
        names = ("codes", "absmax") + (("nested_absmax", "offset") if self.double_quant else ())
        return {k: nf4.LOGICAL_AXES[k] for k in names}


def is_quantized(tree) -> bool:
    return nf4.is_quantized(tree) or int8.is_quantized(tree)


def dequantize_kernel(q: dict, in_shape: tuple, out_shape: tuple, dtype) -> jax.Array:
    """One layer's quantised kernel (either format) in our layout [*in, *out], in `dtype`."""
    if nf4.is_quantized(q):
        return nf4.dequantize_kernel(q, in_shape, out_shape, dtype)
    return int8.dequantize_kernel(q, in_shape, out_shape, dtype)


def _map_targets(fn, tree, targets):
    layers = {sub: dict(v) for sub, v in tree["layers"].items()}
    for t in targets:
        layers[block_of(t)][t] = fn(t, layers[block_of(t)][t])
    return {**tree, "layers": layers}


def quantize_params(params: dict, targets: tuple[str, ...], quant: BaseQuant) -> dict:
    """The base params with each targeted kernel quantised (jit it, donating `params`)."""
    return _map_targets(lambda t, p: quant.quantize_kernel(p["kernel"], N_IN.get(t, 1)), params, targets)


def abstract_params(abstract: dict, targets: tuple[str, ...], quant: BaseQuant) -> dict:
    """The abstract param tree with the targeted kernels as their quantised ShapeDtypeStructs."""
    return _map_targets(lambda t, p: quant.shapes(p["kernel"], N_IN.get(t, 1)), abstract, targets)


def logical_axes(axes: dict, targets: tuple[str, ...], quant: BaseQuant) -> dict:
    """The params' logical-axes tree (PartitionSpecs of names) for the quantised tree."""
    from jax.sharding import PartitionSpec as P

    return _map_targets(lambda t, _: {k: P(*v) for k, v in quant.axes().items()}, axes, targets)


def round_trip(params: dict, targets: tuple[str, ...], quant: BaseQuant) -> dict:
    """The params with each targeted kernel replaced by its dequantised quantisation, in its own dtype: the
    base a QLoRA run trained on, as plain kernels (eval, generation, merged exports)."""
    def one(t, p):
        k, n_in = p["kernel"], N_IN.get(t, 1)
        layer = k.shape[1:]
        deq = lambda q: dequantize_kernel(q, layer[:n_in], layer[n_in:], k.dtype)  # noqa: E731
        return {**p, "kernel": jax.vmap(deq)(quant.quantize_kernel(k, n_in))}

    return _map_targets(one, params, targets)


def restore_quantized(source, leaves, targets_abs: dict, quant_sh: dict, targets: tuple[str, ...],
                      quant: BaseQuant) -> dict:  # fmt: skip
    """The base from a checkpoint Source (checkpoint/sources.py; `leaves`: its layout.LEAVES) with the
    targeted kernels quantised while streaming: one targeted leaf at a time is read onto the devices
    in full precision, quantised there and freed, so the full-precision base never exists whole.
    `targets_abs`: the full-precision abstract params with their shardings; `quant_sh`: the
    quantised tree's shardings."""
    path_of = {t: kernel_path(t) for t in targets}
    params = source.restore(targets_abs, leaves=[leaf for leaf in leaves if leaf.path not in path_of.values()])
    params = {**params, "layers": {sub: dict(v) for sub, v in params.get("layers", {}).items()}}
    for t in targets:
        leaf = next(leaf for leaf in leaves if leaf.path == path_of[t])
        kernel = source.restore(targets_abs, leaves=[leaf])["layers"][block_of(t)][t]["kernel"]
        params["layers"].setdefault(block_of(t), {})[t] = jax.jit(
            lambda k, t=t: quant.quantize_kernel(k, N_IN.get(t, 1)),
            out_shardings=quant_sh["layers"][block_of(t)][t])(kernel)
        del kernel
    return params


# ---- checkpoints bitsandbytes quantised ---------------------------------------------------------


def bnb_kind(directory) -> str | None:
    """"nf4" / "int8" for an HF directory saved by transformers with bitsandbytes 4-bit / 8-bit, else None."""
    import json
    from pathlib import Path

    cfg = Path(directory) / "config.json"
    q = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    if not q or q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_4bit"):
        return "nf4"
    return "int8" if q.get("load_in_8bit") else None


def read_bnb_checkpoint(directory, files: dict, leaves, shapes: dict, targets: tuple[str, ...] = (),
                        quant: BaseQuant | None = None) -> dict:  # fmt: skip
    """A bitsandbytes-quantised HF checkpoint (transformers' save_pretrained) as our host param tree: the
    targeted kernels as their quantised tensors (a copy: per layer, bitsandbytes' tensors flattened), the
    other quantised kernels dequantised (all of them without `targets`), the rest (embeddings, norms,
    lm_head) as stored, in float32. `files`: tensor name -> a function reading it (numpy); `leaves`: checkpoint.layout.LEAVES; `shapes`:
    leaf path -> our stacked shape."""
    out = {}
    for leaf in leaves:
        shape = shapes[leaf.path]
        names = [leaf.hf.format(i=i) for i in range(shape[0])] if leaf.stacked else [leaf.hf]
        missing = [n for n in names if n not in files]
        if missing:
            raise UserError(f"{directory}: missing tensor {missing[0]!r}")
        per = [_bnb_tensors(directory, files, n) for n in names] if leaf.n_in else None
        if per and per[0] is not None:
            kind = "int8" if int8.is_quantized(per[0]) else "nf4"
            t = target_at(leaf.path)
            if t in targets and kind == quant.kind and (kind != "nf4" or ("nested_absmax" in per[0]) == quant.double_quant):
                out[leaf.path] = {k: np.stack([q[k] for q in per]) for k in per[0]}
                continue
            if t in targets and kind != quant.kind:
                raise UserError(f"{directory}: its {t} weights are bitsandbytes {kind}; set lora.quantize_base: {kind}")
            if t in targets:
                nested = "nested_absmax" in per[0]
                raise UserError(f"{directory}: its NF4 scales are {'' if nested else 'not '}double-quantised; set "
                                f"lora.double_quant: {str(nested).lower()}")
            layer_shape = shape[1:]
            deq = lambda q: np.asarray(dequantize_kernel(  # noqa: E731
                {k: jnp.asarray(v) for k, v in q.items()}, layer_shape[:leaf.n_in], layer_shape[leaf.n_in:],
                jnp.float32))
            out[leaf.path] = np.stack([deq(q) for q in per])
            continue
        ws = [files[n]().astype(np.float32) for n in names]
        if leaf.n_in:  # torch [out, in] -> our [*in, *out]
            ws = [w.T.reshape(shape[1:] if leaf.stacked else shape) for w in ws]
        out[leaf.path] = np.stack(ws) if leaf.stacked else ws[0]
    return out


def _bnb_tensors(directory, files: dict, n: str) -> dict | None:
    """One weight's bitsandbytes tensors in our quantised form, or None if it is not quantised."""
    import json

    scb = f"{n.removesuffix('.weight')}.SCB"  # the module's, beside its weight
    if scb in files:  # LLM.int8(): int8 [out, in] and the row absmaxes
        return {"int8": files[n]().reshape(-1), "scb": files[scb]()}
    if f"{n}.quant_state.bitsandbytes__nf4" not in files:
        if any(k.startswith(f"{n}.quant_state.") for k in files):
            raise UserError(f"{directory}: {n} is bitsandbytes FP4; lora.quantize_base reads NF4 and INT8")
        return None
    state = json.loads(bytes(files[f"{n}.quant_state.bitsandbytes__nf4"]()).decode())
    if state["quant_type"] != "nf4" or state["blocksize"] != nf4.BLOCK:
        raise UserError(f"{directory}: {n} is {state['quant_type']} in blocks of {state['blocksize']}; "
                        f"lora.quantize_base: nf4 reads NF4 in blocks of {nf4.BLOCK}")
    q = {"codes": files[n]().reshape(-1), "absmax": files[f"{n}.absmax"]()}
    if "nested_offset" in state:
        q |= {"nested_absmax": files[f"{n}.nested_absmax"](), "offset": np.float32(state["nested_offset"])}
    return q
