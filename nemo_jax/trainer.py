"""`train(cfg)`: everything `train.py` does, from a RunConfig to a finished run directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nemo_jax import context_parallel, fp8, lora, model, preference, quant_base, sharding, train_loop
from nemo_jax.checkpoint import runs
from nemo_jax.config import ModelConfig, block_of
from nemo_jax.errors import UserError
from nemo_jax.fp8 import Fp8Spec
from nemo_jax.hub import model_reference
from nemo_jax.distributed import is_main_process, peers_fail_fast
from nemo_jax.metrics import MetricsWriter, NullWriter, plot_losses
from nemo_jax.records import DataSource
from nemo_jax.run_config import eval_split_name, model_config_for, parse_source
from nemo_jax.tokenizer import tokenizer_for


def lora_spec(cfg) -> model.LoraSpec | None:
    if not cfg.lora.enabled:
        return None
    return model.LoraSpec(rank=cfg.lora.rank, alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                      targets=tuple(cfg.lora.targets))


def fp8_spec(cfg) -> Fp8Spec | None:
    f = cfg.fp8
    if not f.enabled:
        return None
    return Fp8Spec(recipe=f.recipe, amax_history=f.amax_history, margin=f.margin, targets=tuple(f.targets),
                      shared_scales=f.shared_scales, base_fp8=f.store_base, quantize_grads=f.quantize_grads)


def fp8_eval_spec(spec: Fp8Spec | None) -> Fp8Spec | None:
    """Evaluation runs the deployed model's forward: static input scales from the trained state (what
    an hf-fp8 export stores, whatever the training recipe), no gradient quantisation."""
    return dataclasses.replace(spec, quantize_grads=False, recipe="delayed") if spec is not None else None


def device_batch(batch: dict, batch_sh, rows: tuple[int, int] = (0, 1)) -> dict:
    """This process's numpy rows -> global arrays laid out on the mesh; each device gets exactly its
    slice (rows and, on a sequence axis, positions). `rows`: (block, blocks) of sharding.process_rows, which
    says which rows of the global batch the process's `batch` is (the data iterator made it so)."""
    block, blocks = rows
    n, t = np.shape(batch["tokens"])
    first = block * n

    def put(x):
        def part(index):
            r = range(n * blocks)[index[0]]
            return x[r.start - first:r.stop - first, index[1]]

        return jax.make_array_from_callback((n * blocks, t), batch_sh, part)

    return {k: put(np.asarray(batch[k])) for k in train_loop.BATCH_KEYS}


def evaluate_pairs(eval_fn, params, lora_params, reference, batches, batch_sh, max_batches=None, rows=(0, 1)) -> dict:
    """Pair-weighted means of the DPO loss and reward metrics over a preference split, and its pair count."""
    total, sums = 0.0, {}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        s, stats = eval_fn(params, lora_params, reference, device_batch(batch, batch_sh, rows))
        total += float(s)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if not sums.get("count"):
        raise UserError("evaluation split has no preference pairs")
    n = sums["count"]
    return {"dpo_loss": total / n, **{k: sums[k] / n for k in train_loop.REWARD_METRICS}, "pairs": int(n)}


def format_rewards(r: dict) -> str:
    return (f"dpo loss {r['dpo_loss']:.4f}, reward accuracy {r['reward_accuracy']:.1%}, margin "
            f"{r['reward_margin']:.4f} (chosen {r['rewards_chosen']:.4f}, rejected {r['rewards_rejected']:.4f}; "
            f"{r['pairs']} pairs)")


def evaluate(eval_fn, params, lora_params, batches, batch_sh, max_batches=None, rows=(0, 1)) -> tuple[float, float]:
    """Token-weighted mean NLL over every trained token of the split, and the token count."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        s, n = eval_fn(params, lora_params, device_batch(batch, batch_sh, rows))
        total += float(s)
        count += float(n)
    if count == 0:
        raise UserError("evaluation split has no trained tokens")
    return total / count, count


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Everything static about a run's step: model, step spec, optimizer and every sharding.

    With the layer loop fully unrolled (`unstacked`: StepSpec.per_layer), the step's state and frozen params hold each
    layer's weights as arrays of their own (model.unstack_layers; LoRA adapters stay stacked, they
    are small); checkpoints keep the stacked layout (`to_checkpoint` / `from_checkpoint`), so a run
    resumes whatever its model.scan_unroll. `state_sh` / `frozen_sh` are the step's shardings,
    `ckpt_state_sh` / `param_sh` the stacked ones.
    """

    config: ModelConfig
    lora: model.LoraSpec | None
    step_spec: train_loop.StepSpec
    opt: object
    mesh: object
    param_sh: dict
    trainable_sh: dict
    frozen_sh: dict | None
    state_sh: dict
    batch_sh: object
    ckpt_state_sh: dict
    context_parallel: str = "ring"  # mesh.context_parallel: attention over a sequence-sharded mesh
    base_quant: quant_base.BaseQuant | None = None  # lora.quantize_base (None: a full-precision base)

    @property
    def unstacked(self) -> bool:
        return self.step_spec.per_layer

    def step_fn(self):
        step = functools.partial(train_loop.train_step, self.step_spec, self.opt)

        def traced(state, frozen, batch):
            with sharding.activation_mesh(self.mesh), context_parallel.layout(self.context_parallel):
                # zigzag over mesh.sequence (context_parallel.py)
                return step(state, frozen, context_parallel.to_layout(batch))

        return jax.jit(traced, in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
                       out_shardings=(self.state_sh, None), donate_argnums=(0,))

    @property
    def fp8(self) -> Fp8Spec | None:
        return self.step_spec.fp8

    def init_fp8(self):
        """The FP8 scaling state at step 0 (None without FP8)."""
        return model.init_fp8(self.config, self.fp8, self.lora)[0] if self.fp8 is not None else None

    def abstract_state(self):
        """The state as checkpoints hold it (stacked layers)."""
        trainable = self.abstract_trainable()
        state = jax.eval_shape(lambda t: train_loop.init_state(t, self.opt, 0, self.init_fp8()), trainable)
        return sharding.with_shardings(state, self.ckpt_state_sh)

    def abstract_step_inputs(self):
        """(state, frozen) as the step takes them (what `init_arrays` returns), allocating nothing."""
        state = sharding.with_shardings(jax.eval_shape(self.from_checkpoint, self.abstract_state()), self.state_sh)
        frozen = None
        if self.frozen_sh is not None:
            base = self.abstract_params()
            if self.base_quant is not None:
                base = quant_base.abstract_params(base, self.lora.targets, self.base_quant)
            frozen = sharding.with_shardings(jax.eval_shape(self.step_params, base), self.frozen_sh)
        return state, frozen

    def from_checkpoint(self, state):
        """A stacked (checkpoint) state in the step's layout."""
        return self._converters[0](state)

    def to_checkpoint(self, state):
        """The step's state in the stacked layout that checkpoints hold (a copy when unstacked)."""
        return self._converters[1](state)

    def step_params(self, params):
        """Stacked base params (the LoRA base, the distillation teacher) in the step's layout."""
        return self._converters[2](params)

    @functools.cached_property
    def _converters(self):
        """(from_checkpoint, to_checkpoint, step_params), jitted once: to_checkpoint runs at every save."""
        same = lambda x: x
        if not self.unstacked:
            return same, same, same
        to_params = jax.jit(model.unstack_layers, out_shardings=self.frozen_sh) if self.frozen_sh is not None else same
        if self.lora is not None:  # the adapters stay stacked
            return same, same, to_params
        return (jax.jit(functools.partial(_map_param_trees, model.unstack_layers), out_shardings=self.state_sh),
                jax.jit(functools.partial(_map_param_trees, model.stack_layers), out_shardings=self.ckpt_state_sh),
                to_params)

    def abstract_trainable(self):
        abstract = model.abstract_variables(self.config, self.lora)
        tree = abstract["lora"] if self.lora else abstract["params"]
        dtype = jnp.float32 if self.lora else None
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sh),
                            tree, self.trainable_sh)

    def abstract_params(self):
        abstract = model.abstract_variables(self.config)["params"]
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract,
                            self.param_sh)


def make_step_setup(cfg, config: ModelConfig, mesh) -> StepSetup:
    tc = cfg.train
    spec_lora = lora_spec(cfg)
    n_micro = train_loop.n_micro(tc.batch_size, tc.micro_batch_size)
    distill = cfg.fp8.enabled and cfg.fp8.distill
    dpo = dpo_spec(cfg)
    step_spec = train_loop.StepSpec(config, spec_lora, cfg.model.remat, n_micro, tc.loss_chunk, fp8_spec(cfg),
                            cfg.model.scan_unroll, distill=distill, dpo=dpo)
    opt = train_loop.make_optimizer(tc)
    axes = model.logical_axes(config, spec_lora)
    abstract = model.abstract_variables(config, spec_lora)
    param_sh = sharding.tree_shardings(axes["params"], abstract["params"], mesh)
    base_quant = None
    if spec_lora is not None and cfg.lora.quantize_base != "none":
        base_quant = quant_base.BaseQuant(cfg.lora.quantize_base, cfg.lora.double_quant)
    if spec_lora is not None:
        trainable_sh = sharding.tree_shardings(axes["lora"], abstract["lora"], mesh)
        frozen_sh = param_sh
        if base_quant is not None:  # the frozen base as the step holds it: quantised kernels and scales
            t = spec_lora.targets
            frozen_sh = sharding.tree_shardings(quant_base.logical_axes(axes["params"], t, base_quant),
                                                quant_base.abstract_params(abstract["params"], t, base_quant), mesh)
        trainable_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), abstract["lora"])
    else:  # full fine-tuning: `frozen` is the distillation teacher or the DPO reference, if any
        reference = distill or dpo is not None
        trainable_sh, frozen_sh, trainable_abs = param_sh, param_sh if reference else None, abstract["params"]
    fp8_abs = jax.eval_shape(lambda: model.init_fp8(config, step_spec.fp8, spec_lora)[0]) if step_spec.fp8 else None
    ckpt_state_sh = train_loop.state_shardings(opt, trainable_abs, trainable_sh, mesh, fp8_abs)
    state_sh = ckpt_state_sh
    if step_spec.per_layer:
        if spec_lora is None:
            state_sh = _map_param_trees(functools.partial(unstack_shardings, n=config.n_layers), ckpt_state_sh)
        if frozen_sh is not None:
            frozen_sh = unstack_shardings(frozen_sh, config.n_layers)
    return StepSetup(config, spec_lora, step_spec, opt, mesh, param_sh, trainable_sh, frozen_sh, state_sh,
                     sharding.batch_sharding(mesh), ckpt_state_sh, cfg.mesh.context_parallel, base_quant)


def unstack_shardings(tree, n: int):
    """model.unstack_layers for a tree of NamedShardings: each layer's without the leading L axis."""
    if "layers" not in tree:
        return tree
    per = jax.tree.map(lambda sh: NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:])), tree["layers"])
    return {**tree, "layers": [per] * n}


def _map_param_trees(fn, state):
    """fn over a full-fine-tuning state's param-shaped trees: the params and both Adam moments."""
    opt = state["opt_state"]
    return {**state, "trainable": fn(state["trainable"]), "opt_state": opt._replace(mu=fn(opt.mu), nu=fn(opt.nu))}


def dpo_spec(cfg) -> train_loop.DpoSpec | None:
    if cfg.train.objective != "dpo":
        return None
    return train_loop.DpoSpec(beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)


def check_run_config(cfg, config: ModelConfig, n_devices: int | None = None, n_processes: int | None = None):
    """n_devices / n_processes: of the run being planned (a deviceless GPU plan); default: this one's."""
    tc = cfg.train
    if tc.objective == "dpo" and (cfg.fp8.distill or cfg.fp8.store_base):
        raise UserError(f"train.objective: dpo compares the model with its unquantised starting point; it cannot be "
                        f"combined with fp8.{'distill' if cfg.fp8.distill else 'store_base'}")
    n_devices = jax.device_count() if n_devices is None else n_devices
    n_processes = jax.process_count() if n_processes is None else n_processes
    if cfg.fp8.enabled and cfg.fp8.store_base and not cfg.lora.enabled:
        raise UserError("fp8.store_base: storing the base weights in FP8 needs a frozen base (lora.enabled: true); "
                        "full fine-tuning keeps high-precision master weights")
    if cfg.lora.quantize_base != "none" and (not cfg.lora.enabled or cfg.fp8.enabled):
        raise UserError(f"lora.quantize_base: {cfg.lora.quantize_base} stores the frozen LoRA base quantised; it "
                        f"needs lora.enabled: true and fp8.enabled: false")
    if cfg.fp8.distill and not cfg.fp8.enabled:
        raise UserError("fp8.distill: distillation trains the FP8 model towards the unquantised one; it needs "
                        "fp8.enabled: true")
    if cfg.fp8.distill and cfg.fp8.store_base:
        raise UserError("fp8.distill: the teacher is the unquantised base, which fp8.store_base replaces by its "
                        "FP8 copy; use one or the other")
    if tc.seq_len > config.max_seq_len:
        raise UserError(f"train.seq_len ({tc.seq_len}) exceeds the model's max_seq_len ({config.max_seq_len})")
    micro = tc.micro_batch_size or tc.batch_size
    if tc.batch_size % n_processes:
        raise UserError(f"train.batch_size ({tc.batch_size}) must be divisible by the number of "
                        f"processes ({n_processes})")
    mesh = cfg.mesh
    shards = sharding.mesh_shape(mesh.data, mesh.fsdp, mesh.tensor, mesh.sequence, n_devices)
    dp = shards["data"] * shards["fsdp"]
    if micro % dp:
        raise UserError(f"train.micro_batch_size ({micro}) must be divisible by mesh.data x mesh.fsdp ({dp})")
    if tc.seq_len % shards["sequence"]:
        raise UserError(f"train.seq_len ({tc.seq_len}) must be divisible by mesh.sequence ({shards['sequence']})")


# What a checkpoint's state means: resuming under other values of these would silently train
# something else (other shapes, data order, batches, numerics of the saved FP8 scales). Everything
# else may change on resume: train.steps may grow, cadences, lr schedule, mesh, remat, scan_unroll.
RESUME_KEYS = ("model.checkpoint", "model.preset", "model.param_dtype", "lora.enabled", "lora.rank", "lora.alpha",
               "lora.targets", "lora.quantize_base", "lora.double_quant", "train.batch_size", "train.micro_batch_size", "train.seq_len", "train.seed",
               "data.train", "data.tokenizer", "data.streaming", "data.shuffle_window", "fp8", "train.objective")


def check_resume(saved: dict | None, cfg, where: str) -> None:
    """One error naming every RESUME_KEYS setting (`fp8`: each fp8.* key) that differs from the one
    the checkpoint was trained with (`saved`: its meta's resolved config; None for older runs)."""
    if saved is None:
        return
    now = cfg.to_dict()
    get = lambda tree, key: tree.get(key.split(".")[0], {}).get(key.split(".")[1])  # noqa: E731
    keys = []
    for key in RESUME_KEYS:
        if key == "fp8":
            if get(saved, "fp8.enabled") or get(now, "fp8.enabled"):
                keys += [f"fp8.{k}" for k in now["fp8"]]
        elif key.startswith("lora.") and key != "lora.enabled" and not get(now, "lora.enabled"):
            continue  # adapters' settings mean nothing without adapters
        elif key == "train.micro_batch_size" and get(saved, key) is None and get(now, key) is None:
            continue  # unset in both: a changed batch_size is the change
        else:
            keys.append(key)

    def value(tree, key):
        if key == "train.micro_batch_size":  # unset: the whole batch, the same as setting it to batch_size
            return get(tree, key) or get(tree, "train.batch_size")
        if key == "data.streaming":  # runs saved before the key existed were not streamed
            return bool(get(tree, key))
        return get(tree, key)

    show = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    changed = [f"{k} {show(value(saved, k))} -> {show(value(now, k))}" for k in keys
               if show(value(saved, k)) != show(value(now, k))]
    if changed:
        raise UserError(f"{where}: resuming would change what the checkpoint means: {'; '.join(changed)} "
                        f"(keep the values it was trained with, or use a new output_dir)")


def restore_quantized_base(path, setup: StepSetup, dtype: str | None) -> dict:
    """The LoRA base from a checkpoint with its targeted kernels quantised (lora.quantize_base) while
    streaming; a checkpoint bitsandbytes already quantised in that format loads its tensors as they are."""
    from nemo_jax.checkpoint import open_checkpoint
    from nemo_jax.checkpoint.layout import LEAVES, nest, stacked_shape
    from nemo_jax.checkpoint.safetensors_io import tensor_readers
    from nemo_jax.hub import resolve_model

    directory = resolve_model(path)
    quant, targets = setup.base_quant, setup.lora.targets
    if quant_base.bnb_kind(directory) is not None:  # bitsandbytes-4bit / 8-bit: its tensors as they are
        config = setup.config
        shapes = {leaf.path: stacked_shape(leaf, config) for leaf in LEAVES}
        host = quant_base.read_bnb_checkpoint(directory, tensor_readers(directory), LEAVES, shapes, targets, quant)
        tree = nest({(p[:-1] if isinstance(v, dict) else p): v if isinstance(v, dict) else
                        v.astype(jnp.dtype(dtype or config.param_dtype)) for p, v in host.items()})
        axes = quant_base.logical_axes(model.logical_axes(config)["params"], targets, quant)
        return jax.device_put(tree, sharding.tree_shardings(axes, tree, setup.mesh))
    source = open_checkpoint(path)
    targets_abs = sharding.with_shardings(source.abstract(dtype), setup.param_sh)
    axes = quant_base.logical_axes(model.logical_axes(setup.config)["params"], targets, quant)
    stacked_sh = sharding.tree_shardings(axes, quant_base.abstract_params(targets_abs, targets, quant), setup.mesh)
    return quant_base.restore_quantized(source, LEAVES, targets_abs, stacked_sh, targets, quant)


def init_arrays(setup: StepSetup, seed: int, base: dict | None):
    """(state, frozen) on the mesh: base params initialised from `seed` (from scratch) or given."""
    config = setup.config
    base_rng, lora_rng = jax.random.split(jax.random.key(seed))
    if base is None:
        base = jax.jit(lambda r: model.init_params(config, r)["params"], out_shardings=setup.param_sh)(base_rng)
    elif setup.base_quant is None:  # (a quantised base comes placed, from restore_quantized_base)
        base = jax.device_put(base, setup.param_sh)
    fp8_state = setup.init_fp8()
    if setup.fp8 is not None and setup.fp8.base_fp8:
        rep = sharding.replicated(setup.mesh)
        base, fp8_state = jax.jit(functools.partial(fp8.quantize_base, spec=setup.fp8), donate_argnums=(0,),
                                  out_shardings=(setup.param_sh, jax.tree.map(lambda _: rep, fp8_state)))(
                                      base, fp8_state)
    t0 = setup.lora.targets[0] if setup.lora is not None else None
    if setup.base_quant is not None and not quant_base.is_quantized(base["layers"][block_of(t0)][t0]):
        quantize = functools.partial(quant_base.quantize_params, targets=setup.lora.targets, quant=setup.base_quant)
        base = jax.jit(quantize, out_shardings=setup.frozen_sh if not setup.unstacked else None)(base)
    if setup.lora is not None:
        trainable = jax.device_put(lora.init_lora(config, setup.lora, lora_rng), setup.trainable_sh)
        frozen = base
    elif setup.step_spec.distill or setup.step_spec.dpo is not None:
        # the teacher / the DPO reference: a copy of the starting weights (the step donates its state)
        trainable, frozen = base, jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=setup.param_sh)(base)
    else:
        trainable, frozen = base, None
    state = jax.jit(lambda t, f: train_loop.init_state(t, setup.opt, seed, f), out_shardings=setup.ckpt_state_sh)(
        trainable, fp8_state)
    return setup.from_checkpoint(state), setup.step_params(frozen) if frozen is not None else None


def train(cfg) -> Path:
    from nemo_jax.data import make_eval_batches, make_train_iterator
    from nemo_jax.streaming import make_stream_iterator

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    mngr = runs.checkpoint_manager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    start = mngr.latest_step() or 0
    if start:  # before any weights are read: a resume that would mean something else stops here
        check_resume(runs.read_checkpoint_meta(mngr, start).get("config"), cfg, f"{run_dir / 'checkpoints'}/{start}")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.sequence)
    config = model_config_for(cfg)
    check_run_config(cfg, config)
    tokenizer = tokenizer_for(config, cfg.data.tokenizer)
    setup = make_step_setup(cfg, config, mesh)
    base = None
    if cfg.model.checkpoint:  # read straight into the target shardings: no full replica anywhere
        from nemo_jax.checkpoint import restore

        if setup.base_quant is not None:  # quantised leaf by leaf as it streams in (quant_base.py)
            base = restore_quantized_base(cfg.model.checkpoint, setup, cfg.model.param_dtype)
        else:
            _, base = restore(cfg.model.checkpoint, setup.param_sh, dtype=cfg.model.param_dtype)
    spec_lora, batch_sh = setup.lora, setup.batch_sh
    state, frozen = init_arrays(setup, tc.seed, base)
    del base

    # Each process reads the rows its devices hold (sharding.process_rows), as data.py's "process" block.
    train_rows = sharding.process_rows(batch_sh, (tc.batch_size, tc.seq_len))
    if tc.objective == "dpo" and cfg.data.streaming:
        raise UserError("data.streaming: preference pairs (train.objective: dpo) are read up front; set "
                        "data.streaming: false")
    if tc.objective == "dpo":  # preference pairs, one per row (preference.py)
        train_iter = preference.make_pair_iterator(
            [s if isinstance(s, DataSource) else DataSource(*parse_source(s)) for s in cfg.data.train], tokenizer,
            tc.seq_len, tc.batch_size, tc.seed, skip_bad_records=cfg.data.skip_bad_records,
            process_index=train_rows[0], process_count=train_rows[1])
    elif cfg.data.streaming:  # read and tokenized while the steps run (streaming.py)
        train_iter = make_stream_iterator(
            list(cfg.data.train), tokenizer, tc.seq_len, tc.batch_size, tc.seed,
            skip_bad_records=cfg.data.skip_bad_records, process_index=train_rows[0],
            process_count=train_rows[1], shuffle_window=cfg.data.shuffle_window)
    else:
        train_iter = make_train_iterator(
            list(cfg.data.train), tokenizer, tc.seq_len, tc.batch_size, tc.seed,
            skip_bad_records=cfg.data.skip_bad_records, process_index=train_rows[0],
            process_count=train_rows[1], num_proc=cfg.data.num_proc)

    if start:
        state, meta = runs.restore_checkpoint(mngr, start, setup.abstract_state())
        state = setup.from_checkpoint(state)
        train_iter.restore(meta["data_state"])
        print(f"resuming from step {start} in {run_dir / 'checkpoints'}", flush=True)
    if start >= tc.steps:
        print(f"{run_dir}: already trained for {start} steps (train.steps = {tc.steps}); nothing to do")
        return run_dir

    run_info = {
        "format": "nemo_jax-run",
        "model": config.to_dict(),
        "lora": dataclasses.asdict(spec_lora) if spec_lora else None,
        "fp8": dataclasses.asdict(setup.fp8) if setup.fp8 else None,
        "base": {"checkpoint": model_reference(cfg.model.checkpoint) if cfg.model.checkpoint else None,
                 "preset": cfg.model.preset, "seed": tc.seed,
                 # QLoRA: the base the adapters trained on is the quantised one (checkpoint/runs.load_run)
                 "quantize": dataclasses.asdict(setup.base_quant) if setup.base_quant else None},
    }
    main = is_main_process()  # one writer of run files and metrics in a multi-host run
    if main:
        runs.write_json_atomic(run_dir / "run.json", run_info)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    batch_sh = sharding.batch_sharding(mesh)
    step_fn = setup.step_fn()
    eval_sums = jax.jit(functools.partial(
        train_loop.eval_sums, dataclasses.replace(setup.step_spec, fp8=fp8_eval_spec(setup.fp8))))
    eval_fn = lambda params, lora_params, batch: eval_sums(params, lora_params, batch, state.get("fp8"))
    eval_bs = tc.micro_batch_size or tc.batch_size
    eval_rows = sharding.process_rows(batch_sh, (eval_bs, tc.seq_len))

    dpo_eval = jax.jit(functools.partial(train_loop.dpo_eval_sums, dataclasses.replace(setup.step_spec, fp8=None)))

    def run_eval(step):
        params, lora_params = (frozen, state["trainable"]) if spec_lora else (state["trainable"], None)
        for path in cfg.data.eval:
            if preference.is_preference_source(path):  # reward metrics against the reference (LoRA: the base)
                batches = preference.make_pair_eval_batches(path, tokenizer, tc.seq_len, eval_bs,
                                                            skip_bad_records=cfg.data.skip_bad_records,
                                                            process_index=eval_rows[0], process_count=eval_rows[1])
                ref = frozen if frozen is not None else params
                rec = {"step": step, "split": eval_split_name(path),
                       **evaluate_pairs(dpo_eval, params, lora_params, ref, batches, batch_sh, tc.eval_batches,
                                        eval_rows)}
                rec["eval_loss"] = rec["dpo_loss"]  # the split's loss curve in loss.png
                writer.log(rec)
                tqdm.write(f"step {step}: eval {rec['split']}: " + format_rewards(rec))
                continue
            batches = make_eval_batches(path, tokenizer, tc.seq_len, eval_bs, skip_bad_records=cfg.data.skip_bad_records,
                                        num_proc=cfg.data.num_proc, process_index=eval_rows[0],
                                        process_count=eval_rows[1])
            loss, count = evaluate(eval_fn, params, lora_params, batches, batch_sh, tc.eval_batches, eval_rows)
            rec = {"step": step, "split": eval_split_name(path), "eval_loss": loss, "perplexity": float(np.exp(loss)),
                   "tokens": int(count)}
            writer.log(rec)
            tqdm.write(f"step {step}: eval {rec['split']}: loss {loss:.4f} (ppl {rec['perplexity']:.2f}, "
                       f"{int(count)} tokens)")

    def save(step, force=False):
        meta = {"step": step, "data_state": train_iter.state(), "config": cfg.to_dict()}
        runs.save_checkpoint(mngr, step, setup.to_checkpoint(state), meta, force=force)

    writer = MetricsWriter(run_dir, start) if main else NullWriter()
    flops_tok = train_loop.flops_per_token(config, tc.seq_len, spec_lora is not None)
    # MFU is only written by process 0; the others skip the CPU peak measurement (~1.5 s of matmuls)
    peak = train_loop.peak_flops_per_device() * jax.device_count() if main else float("nan")
    tokens_per_step = tc.batch_size * tc.seq_len
    schedule = train_loop.lr_schedule(tc)
    if start == 0 and cfg.data.eval and tc.eval_every:
        run_eval(0)

    stop = train_loop.StopFlag()
    agreed_stop = train_loop.AgreedStop(stop, mesh)
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=not main)
    step = start
    t_last, steps_since = time.perf_counter(), 0
    with peers_fail_fast():  # a peer that died ends this process at once (distributed.py)
        with stop:
            while step < tc.steps:
                batch = device_batch(next(train_iter), batch_sh, train_rows)
                state, metrics = step_fn(state, frozen, batch)
                step += 1
                steps_since += 1
                bar.update(1)
                signum = agreed_stop()
                if step % tc.log_every == 0 or step == tc.steps:
                    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
                    now = time.perf_counter()
                    tps = tokens_per_step * steps_since / (now - t_last)
                    t_last, steps_since = now, 0
                    rec = {"step": step, "loss": loss, "lr": float(schedule(step - 1)), "grad_norm": gnorm,
                           "tokens_per_sec": tps, "mfu": tps * flops_tok / peak,
                           "trained_tokens": int(metrics["tokens"])}
                    rec.update({k: float(metrics[k]) for k in train_loop.REWARD_METRICS if k in metrics})
                    writer.log(rec)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:,.0f}")
                    if not np.isfinite(loss):
                        raise UserError(f"step {step}: loss is {loss}; stopping (lower train.lr or check the data)")
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    run_eval(step)
                if signum is not None:
                    save(step, force=True)
                    mngr.wait_until_finished()
                    bar.close()
                    writer.close()
                    print(f"stopped at step {step}; checkpoint saved in {run_dir / 'checkpoints'}; "
                          f"run the same command again to resume", flush=True)
                    sys.exit(128 + signum)
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != tc.steps:
                    save(step)
        bar.close()
        if cfg.data.eval:
            run_eval(step)
        save(step, force=True)
        mngr.wait_until_finished()
    writer.close()
    plot = plot_losses(run_dir) if main else None
    print(f"done: {step} steps. run directory {run_dir}: checkpoints/, metrics.jsonl, tb/"
          + (f", {plot.name}" if plot else ""), flush=True)
    return run_dir

