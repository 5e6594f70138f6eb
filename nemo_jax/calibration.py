"""Post-training FP8 calibration: the static input scales of an hf-fp8 export of a model trained
without FP8, from the activations of a forward pass over calibration data.

It lives above checkpoint/ because it runs the model on tokenized data with the loss (data,
tokenizer, losses); checkpoint/fp8_io.py receives it as `ExportOptions.calibrate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from nemo_jax import fp8, model
from nemo_jax.checkpoint import layout
from nemo_jax.config import ModelConfig
from nemo_jax.data import make_eval_batches
from nemo_jax.errors import UserError
from nemo_jax.losses import chunked_nll_sum
from nemo_jax.tokenizer import tokenizer_for


def calibrate(source, config: ModelConfig, spec: fp8.Fp8Spec, opts) -> dict:
    """An FP8 state whose input scales are the max amax seen over the calibration batches.

    The forward runs with current scaling (each activation quantised with its own amax), the
    closest thing to the deployed model before its static scales exist."""
    params = {}
    for leaf in layout.LEAVES:
        params[leaf.path] = jnp.asarray(source.read_leaf(leaf, "float32"))
    params = layout.nest(params)
    cal = dataclasses.replace(spec, recipe="current", quantize_grads=False)
    state0, probes = model.init_fp8(config, cal)
    tokenizer = tokenizer_for(config, getattr(opts, "tokenizer", None))

    @jax.jit
    def observe(batch):
        def loss(p):
            hidden, head = model.forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                         fp8=model.Fp8Scaling(cal, state0, p), return_hidden=True)
            return chunked_nll_sum(hidden, head, batch["targets"], batch["loss_mask"], 512, jnp.float32)
        return jax.grad(loss)(probes)

    seen = None
    n = 0
    for path in opts.calibration:
        if not Path(path).exists():
            raise UserError(f"--calibration-data {path}: no such file")
        for batch in make_eval_batches(path, tokenizer, opts.calibration_seq_len, opts.calibration_batch_size):
            obs = observe({k: jnp.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                              "positions")})
            seen = obs if seen is None else fp8.combine_observations(seen, obs)
            n += 1
            if n >= opts.calibration_batches:
                break
        if n >= opts.calibration_batches:
            break
    if seen is None:
        raise UserError(f"--calibration-data: no batches in {', '.join(opts.calibration)}")
    return fp8.update_state(state0, seen, cal)
