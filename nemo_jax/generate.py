"""Batched generation with a KV cache: prefill the prompts in one call, then one token per step.

    new_ids = generate(config, params, [prompt_ids, ...], max_new_tokens=128)

How a batch is laid out. Prompts are left-padded to a common length T (rounded up to a bucket, so
that similar batches reuse one compiled program); row b's first real token sits at slot T - n_b. The
cache (model.init_cache) has a fixed S = T + max_new_tokens slots, rounded up, and a `valid` bit
per slot. Rope positions are per row and start at 0 at each prompt's first real token, and padding
slots are never attended (attention.new_token_mask, the cache's `valid` bits), so padding changes
nothing a real token sees. Right padding (`padding="right"`) leaves a gap of invalid slots between
a short prompt and its first new token, which the mask makes equivalent; the tests check both
against each prompt alone.

The whole decode is one jitted `lax.while_loop`: the step has fixed shapes ([B, 1] tokens, a
[L, B, K, S, H] cache), stops early once every row has produced `eos_id`, and never returns to
Python between tokens. Greedy when temperature is 0; otherwise temperature, then top-k, then
top-p (nucleus) filtering, then a draw from `jax.random.key(seed)` folded with the step number.

Nothing here names a device: params sharded on a mesh go into the same jit, and XLA places the
cache and activations to match.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import model
from nemo_jax.config import ModelConfig
from nemo_jax.errors import UserError

PAD_ID = 0  # written into padding slots; they are masked, so any id would do


def check_sampling(temperature, top_k, top_p):
    """A UserError naming the first sampling knob out of range."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample(logits, key, temperature, top_k, top_p):
    """Token ids [B] drawn from float32 logits [B, V] / temperature, restricted to the top_k most
    likely (0: all) and then to the smallest set whose probability reaches top_p (1: all; the most
    likely token always stays). The knobs are traced values: changing them does not recompile."""
    logits = logits / temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
    V = logits.shape[-1]
    kth = jnp.take(ranked, jnp.where(top_k > 0, jnp.minimum(top_k, V), V) - 1, axis=-1)[:, None]
    ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < jnp.maximum(kth, cutoff), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_bucket(n: int) -> int:
    """Prompts are padded to 32, 64, ..., 1024 tokens, then multiples of 1024: an evaluation over
    prompts of every length compiles a handful of programs, and prefill wastes at most 2x (or 1024)."""
    return max(32, 1 << (n - 1).bit_length()) if n <= 1024 else _round_up(n, 1024)


def _batch_bucket(n: int) -> int:
    """Rows are padded to 1, 2, 4, 8, then multiples of 8: few distinct compiled batch sizes."""
    return 1 << (n - 1).bit_length() if n <= 8 else _round_up(n, 8)


def _last_logits(hidden, head, idx):
    """float32 logits [B, V] of the hidden state at index idx[b] of each row."""
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, D]
    return jnp.einsum("BD,DV->BV", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


class Prompts(NamedTuple):
    """A batch of prompts as laid out in the cache (the module docstring): [B, T] each, [B] for the last two."""

    tokens: np.ndarray  # int32, PAD_ID in padding slots
    positions: np.ndarray  # int32 rope positions, 0 at each prompt's first real token
    valid: np.ndarray  # bool: a real token, not padding
    last: np.ndarray  # int32: the slot of each row's last prompt token
    done: np.ndarray  # bool: a batch-padding row, finished from the start


class Sampling(NamedTuple):
    """The traced knobs of a generation: changing them does not recompile."""

    max_new: np.int32
    eos_id: np.int32  # -1: none
    seed: np.uint32
    temperature: np.float32  # > 0 (greedy decoding is DecodeSpec.greedy)
    top_k: np.int32  # 0: all
    top_p: np.float32  # 1: all


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What one compiled generation program is specialised for (jit's static argument)."""

    config: ModelConfig
    lora: model.LoraSpec | None
    cache_len: int  # S: the cache's slots, prompts and new tokens
    greedy: bool


@functools.partial(jax.jit, static_argnames=("spec",))
def _generate(params, lora_params, prompts: Prompts, sampling: Sampling, *, spec: DecodeSpec):
    """-> (new tokens [B, cache_len - T], number of steps run). See the module docstring."""
    B, T = prompts.tokens.shape
    key = jax.random.key(sampling.seed)

    def choose(logits, step):
        if spec.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample(logits, jax.random.fold_in(key, step), sampling.temperature, sampling.top_k, sampling.top_p)

    run = functools.partial(model.forward, spec.config, params, adapters=model.Adapters.of(spec.lora, lora_params),
                            return_hidden=True)
    cache = model.init_cache(spec.config, B, spec.cache_len)
    (hidden, head), cache = run(prompts.tokens, prompts.positions, prompts.valid.astype(jnp.int32),
                                decoding=model.Decoding(cache, 0))
    tok = choose(_last_logits(hidden, head, prompts.last), 0)
    out = jnp.zeros((B, spec.cache_len - T), jnp.int32).at[:, 0].set(tok)
    eos_id = sampling.eos_id
    done = prompts.done | (tok == eos_id)
    pos = jnp.take_along_axis(prompts.positions, prompts.last[:, None], axis=1)[:, 0] + 1  # `tok`'s, per row

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < sampling.max_new) & ~jnp.all(done)

    def body(state):
        step, tok, pos, cache, done, out = state  # tok (chosen at step - 1) goes in at slot T + step - 1
        (hidden, head), cache = run(tok[:, None], pos[:, None], decoding=model.Decoding(cache, T + step - 1))
        new = choose(_last_logits(hidden, head, jnp.zeros((B,), jnp.int32)), step)
        new = jnp.where(done, PAD_ID, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, new, pos + 1, cache, done | (new == eos_id), out

    step, *_, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, pos, cache, done, out))
    return out, step


def generate(config: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0, *,
             lora_params: dict | None = None, lora: model.LoraSpec | None = None, eos_id: int | None = 2,
             padding: str = "left") -> list[list[int]]:
    """New token ids for each prompt (lists of ids): up to `max_new_tokens`, ending at `eos_id` (kept)
    when it is generated. `eos_id=None` always generates `max_new_tokens`.

    Greedy by default; `temperature` > 0 samples, after top-k and top-p filtering, reproducibly for a
    given `seed` and batch. `lora_params`/`lora` apply a LoRA adapter without merging it.
    """
    check_sampling(temperature, top_k, top_p)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return []
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if padding not in ("left", "right"):
        raise UserError(f"padding must be 'left' or 'right', got {padding!r}")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompts[{i}] is empty")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise UserError(f"prompts[{i}]: token ids must lie in [0, {config.vocab_size}), "
                            f"got {min(p)}..{max(p)}")
        if len(p) + max_new_tokens > config.max_seq_len:
            raise UserError(f"prompts[{i}]: {len(p)} prompt + {max_new_tokens} new tokens exceed the model's "
                            f"max_seq_len ({config.max_seq_len})")
    if lora_params is not None and lora is None:
        raise UserError("lora_params given without their LoraSpec (lora=)")

    n = len(prompts)
    B = _batch_bucket(n)
    T = _prompt_bucket(max(map(len, prompts)))
    cache_len = _round_up(T + max_new_tokens, 64)
    tokens = np.full((B, T), PAD_ID, np.int32)
    positions = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    last = np.zeros(B, np.int32)
    for b in range(B):
        p = prompts[b] if b < n else prompts[0][:1]  # batch padding rows: done from the start
        start = T - len(p) if padding == "left" else 0
        tokens[b, start:start + len(p)] = p
        positions[b, start:start + len(p)] = np.arange(len(p))
        valid[b, start:start + len(p)] = True
        last[b] = start + len(p) - 1
    done = np.arange(B) >= n
    sampling = Sampling(np.int32(max_new_tokens), np.int32(-1 if eos_id is None else eos_id),
                        np.uint32(seed & 0xFFFFFFFF), np.float32(temperature or 1.0), np.int32(top_k or 0),
                        np.float32(top_p or 1.0))
    spec = DecodeSpec(config, lora if lora_params is not None else None, cache_len, greedy=temperature == 0)
    out, steps = _generate(params, lora_params, Prompts(tokens, positions, valid, last, done), sampling, spec=spec)
    out = np.asarray(out)[:n, :int(steps)]
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        results.append(row)
    return results


class _CallableModule(types.ModuleType):
    """`nemo_jax.generate` names both this module and the function: importing the module makes the
    package attribute the module, so the module is made callable to keep `nemo_jax.generate(...)`
    working however it was reached."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
