"""Run configuration: YAML files in configs/ -> frozen, typed dataclasses, validated once, at load.

    cfg = load_config("configs/lora.yaml", ["train.lr=1e-5", "lora.targets=[q,v]"])
    cfg.train.lr, cfg.lora.targets        # 1e-05, ('q', 'v')

No schema library: each section is a frozen dataclass whose type hints are the schema (`int`, `float`,
`bool`, `str`, `X | None`, and `tuple[str, ...]` for YAML lists) and whose field metadata holds bounds and
choices. Validation runs in `__post_init__`, so a config built in code (or changed with `.replace`) is
checked the same way as one read from a file. Every mistake is a one-line `UserError` that says where it was
made (file and line, taken from the YAML node marks, or the `--set` argument) and names the key path:

    configs/x.yaml:7: unknown key lora.rnak — did you mean lora.rank?
    configs/x.yaml:12: train.lr: expected float, got 'fast'
    --set train.steps=0: train.steps: must be > 0, got 0

Friendly where YAML 1.1 is not: it reads `1e-4` (no dot) as a string, so float keys accept numeric strings;
ints are accepted for floats; booleans are never numbers. A single string where a list is expected is a
one-element list, and a section written with no keys (`lora:`) is an empty section.

Paths (`output_dir`, `model.checkpoint`, `data.train`, `data.eval`, `data.tokenizer`) are kept exactly as
written: a relative path is relative to the current directory of the process, NOT to the config file (the
shipped configs assume the repository root).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from nemo_jax.config import DTYPES, PRESETS, ModelConfig, preset
from nemo_jax.context_parallel import STRATEGIES as CONTEXT_PARALLEL
from nemo_jax.errors import UserError
from nemo_jax.fp8 import DEFAULT_TARGETS as FP8_DEFAULT_TARGETS
from nemo_jax.fp8 import RECIPES as FP8_RECIPES
from nemo_jax.fp8 import TARGETS as FP8_TARGETS
from nemo_jax.model import LORA_TARGETS, REMAT_POLICIES
from nemo_jax.records import DataSource, source_from_mapping

OBJECTIVES = ("sft", "dpo")
SCHEDULES = ("cosine", "linear", "constant")


# --- field machinery -------------------------------------------------------------------------------


class _ConfigError(UserError):
    """A config mistake; `loc` is the key path (or list item, `data.train[2]`) to point the user at.

    Raised bare (no file or line) when a config is built in code; the loader re-raises it as a plain
    UserError prefixed with where the key was written.
    """

    def __init__(self, message: str, loc: str):
        super().__init__(message)
        self.loc = loc


def _bad(path: str, msg: str, loc: str | None = None) -> _ConfigError:
    return _ConfigError(f"{path}: {msg}", loc or path)


def _field(default=dataclasses.MISSING, *, gt=None, ge=None, lt=None, le=None, choices=None, item="value"):
    """A dataclass field with bounds (gt/ge/lt/le) or `choices` (also applied to each item of a list)."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "item": item}
    return dataclasses.field(default=default, metadata=meta)


def _show(v) -> str:
    """A value as the user wrote it in YAML (true, null, [a, b]), not as Python prints it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _did_you_mean(word, options) -> str:
    m = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" — did you mean {m[0]}?" if m else ""


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Section)


def _coerce(tp, v, path: str):
    """Check `v` against the type hint `tp`; return it in canonical form (float for float, tuple for lists)."""
    if isinstance(tp, types.UnionType):  # X | None
        if v is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        or_null = " or null"
    else:
        or_null = ""
    if _is_section(tp):
        if isinstance(v, tp):
            return v
        if v is None:
            v = {}
        if not isinstance(v, Mapping):
            raise _bad(path, f"expected a section (a mapping of keys), got {_show(v)}")
        return _build(tp, v, path)
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]; tuple[str | DataSource, ...]: data sources
        sources = DataSource in typing.get_args(typing.get_args(tp)[0])
        if isinstance(v, (str, DataSource)):
            v = [v]
        if not isinstance(v, Sequence) or isinstance(v, (str, bytes)):
            raise _bad(path, f"expected a list of strings{or_null}, got {_show(v)}")
        v = list(v)
        for i, x in enumerate(v):
            if isinstance(x, os.PathLike):
                x = os.fspath(x)
            if sources and isinstance(x, Mapping) and (len(x) != 1 or "path" in x):  # {path: ..., columns: ...}
                try:
                    v[i] = source_from_mapping(x)
                except UserError as e:
                    raise _bad(path, f"item {i + 1}: {e}", f"{path}[{i}]") from None
                continue
            if sources and isinstance(x, DataSource):
                continue
            if not isinstance(x, str) or not x:
                hint = ""
                if isinstance(x, Mapping) and len(x) == 1:
                    hint = " (write 'path:weight' with no space after the colon)"
                raise _bad(path, f"item {i + 1}: expected a non-empty string, got {_show(x)}{hint}", f"{path}[{i}]")
        return tuple(x if isinstance(x, DataSource) else os.fspath(x) for x in v)
    if tp is bool:
        if not isinstance(v, bool):
            raise _bad(path, f"expected true or false{or_null}, got {_show(v)}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(path, f"expected int{or_null}, got {_show(v)}")
        return v
    if tp is float:
        x = v
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                x = float(v)
            except ValueError:
                pass
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            raise _bad(path, f"expected float{or_null}, got {_show(v)}")
        if not math.isfinite(x):
            raise _bad(path, f"expected a finite float{or_null}, got {_show(v)}")
        return float(x)
    if tp is str:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str):
            raise _bad(path, f"expected str{or_null}, got {_show(v)}")
        if not v:
            raise _bad(path, "must not be empty")
        return v
    raise TypeError(f"{path}: unsupported field type {tp!r}")  # a bug in this module, not a user mistake


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_bounds(meta, v, path: str):
    if v is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        options = ", ".join(choices)
        if isinstance(v, tuple):
            for i, x in enumerate(v):
                if x not in choices:
                    raise _bad(path, f"unknown {meta['item']} {x!r} (choose from {options}){_did_you_mean(x, choices)}",
                               f"{path}[{i}]")
        elif v not in choices:
            raise _bad(path, f"expected one of {options}, got {_show(v)}{_did_you_mean(v, choices)}")
    gt, ge, lt, le = meta.get("gt"), meta.get("ge"), meta.get("lt"), meta.get("le")
    if (gt is not None and v <= gt) or (ge is not None and v < ge) or (lt is not None and v >= lt) or (
            le is not None and v > le):
        lo = (">=", "[", ge) if ge is not None else (">", "(", gt) if gt is not None else None
        hi = ("<=", "]", le) if le is not None else ("<", ")", lt) if lt is not None else None
        if lo and hi:
            rule = f"in {lo[1]}{_num(lo[2])}, {_num(hi[2])}{hi[1]}"
        else:
            op, _, bound = lo or hi
            rule = f"{op} {_num(bound)}"
        raise _bad(path, f"must be {rule}, got {_show(v)}")


class _Section:
    """Base of every config section: type/bounds checks on construction, then the section's own `_validate`."""

    _section = ""  # key path of this section in RunConfig ("" for the root)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            path = _join(self._section, f.name)
            v = _coerce(_hints(type(self))[f.name], getattr(self, f.name), path)
            _check_bounds(f.metadata, v, path)
            object.__setattr__(self, f.name, v)
        self._validate()

    def _validate(self):
        pass

    def _path(self, name: str) -> str:
        return _join(self._section, name)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars (JSON/YAML-safe), in declaration order."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Section) else \
                [x.to_dict() if isinstance(x, DataSource) else x for x in v] if isinstance(v, tuple) else v
        return out


def _check_list(section: _Section, name: str, *, allow_empty: bool):
    path, items = section._path(name), getattr(section, name)
    if not items and not allow_empty:
        raise _bad(path, "must list at least one entry")
    for i, x in enumerate(items):
        if x in items[:i]:
            raise _bad(path, f"{x!r} is listed twice", f"{path}[{i}]")


# --- sections -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection(_Section):
    """Where the weights come from and the dtypes they are trained in."""

    _section = "model"
    checkpoint: str | None = None  # orbax checkpoint, training run dir, or HF/Mistral safetensors dir
    preset: str | None = _field(None, choices=tuple(PRESETS))  # train from scratch
    dtype: str = _field("bfloat16", choices=DTYPES)  # compute
    param_dtype: str = _field("float32", choices=DTYPES)
    remat: str = _field("none", choices=tuple(REMAT_POLICIES))
    scan_unroll: int = _field(1, ge=1)  # layers per iteration of the layer loop (more than L: L)

    def _validate(self):
        if self.checkpoint is None and self.preset is None:
            raise _ConfigError("model: set exactly one of model.checkpoint (start from weights) or model.preset "
                            "(train from scratch)", "model")
        if self.checkpoint is not None and self.preset is not None:
            raise _ConfigError("model: model.checkpoint and model.preset are both set; set exactly one "
                            "(checkpoint: start from weights, preset: train from scratch)", "model.preset")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _split_weight(s: str) -> tuple[str, float | None]:
    head, sep, tail = s.rpartition(":")
    if not sep:
        return s, None
    tail = tail.strip()
    if not tail:
        raise UserError(f"{s!r}: nothing after ':'; write 'path' or 'path:weight'")
    if not _NUMBER.fullmatch(tail):
        return s, None  # the ':' belongs to the path
    if not head:
        raise UserError(f"{s!r}: empty path before ':{tail}'")
    weight = float(tail)
    if not weight > 0:
        raise UserError(f"{s!r}: weight must be a positive number, got {tail}")
    return head, weight


def parse_source(s: str) -> tuple[str, float]:
    """'path' -> (path, 1.0); 'path:weight' -> (path, weight), weight a positive number.

    Only the text after the LAST ':' is tried as a weight, and only when it is a plain decimal number
    (`2`, `0.5`, `1e-3`), so a path may itself contain ':' as long as what follows its last ':' is not a
    number (`hf://x`, `a:b.jsonl`); to use such a path with weight 1, write `path:1`. Relative paths are
    kept as given (relative to the current directory).
    """
    path, weight = _split_weight(s)
    return path, 1.0 if weight is None else weight


def eval_split_name(path: str | DataSource) -> str:
    """The name an eval file's metrics are reported under: its file name without the last suffix."""
    return path.name if isinstance(path, DataSource) else Path(path).stem


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection(_Section):
    _section = "data"
    train: tuple[str | DataSource, ...]  # "path" or "path:weight" (see parse_source), or {path: ..., ...}
    eval: tuple[str | DataSource, ...] = ()  # one split per file, named after its stem
    tokenizer: str | None = None  # tekken.json; None = NeMo's
    skip_bad_records: bool = False
    num_proc: int | None = _field(None, gt=0)
    streaming: bool = False  # read and tokenize train sources while training (streaming.py), nothing up front
    shuffle_window: int | None = _field(None, gt=0)  # streaming: records shuffled together; None = 10000

    def _validate(self):
        _check_list(self, "train", allow_empty=False)
        if self.shuffle_window is not None and not self.streaming:
            raise _bad("data.shuffle_window", "applies to streamed sources only (data.streaming: true); in-memory "
                                              "sources are shuffled whole")
        for i, s in enumerate(self.train):
            try:
                if isinstance(s, str):
                    parse_source(s)
            except UserError as e:
                raise _bad("data.train", str(e), f"data.train[{i}]") from None
        _check_list(self, "eval", allow_empty=True)
        seen = {}
        for i, s in enumerate(self.eval):
            try:
                weight = (None if s.weight == 1.0 else s.weight) if isinstance(s, DataSource) else _split_weight(s)[1]
            except UserError as e:
                raise _bad("data.eval", str(e), f"data.eval[{i}]") from None
            if weight is not None:
                raise _bad("data.eval", f"{getattr(s, 'path', s)!r}: eval files take no weight", f"data.eval[{i}]")
            name = eval_split_name(s)
            if name in seen:
                raise _bad("data.eval", f"{seen[name]!r} and {s!r} would both report as split {name!r}; "
                                        "each eval file is a split named after its stem", f"data.eval[{i}]")
            seen[name] = s

    @property
    def train_sources(self) -> list[tuple[str, float]]:
        return [(s.path, s.weight) if isinstance(s, DataSource) else parse_source(s) for s in self.train]

    @property
    def eval_splits(self) -> dict[str, str]:
        """{split name: path}, in config order."""
        return {eval_split_name(s): s for s in self.eval}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection(_Section):
    _section = "train"
    steps: int = _field(gt=0)
    batch_size: int = _field(gt=0)  # sequences per optimizer step, global
    micro_batch_size: int | None = _field(None, gt=0)  # gradient accumulation; must divide batch_size
    seq_len: int = _field(gt=1)
    lr: float = _field(gt=0)
    schedule: str = _field("cosine", choices=SCHEDULES)
    warmup_steps: int = _field(0, ge=0)
    min_lr_ratio: float = _field(0.1, ge=0, le=1)  # final lr / peak lr for cosine and linear decay
    weight_decay: float = _field(0.0, ge=0)
    beta1: float = _field(0.9, ge=0, lt=1)
    beta2: float = _field(0.95, ge=0, lt=1)
    eps: float = _field(1e-8, gt=0)
    grad_clip: float | None = _field(1.0, gt=0)  # global-norm clipping; null = off
    seed: int = _field(0, ge=0)
    log_every: int = _field(1, gt=0)
    eval_every: int = _field(0, ge=0)  # 0 = only at the end
    eval_batches: int | None = _field(None, gt=0)  # max batches per eval split; null = all
    loss_chunk: int = _field(1024, gt=0)  # sequence positions per cross-entropy chunk ([B, chunk, V] fp32 logits)
    # sft: next-token NLL on the trained tokens; dpo: preference pairs (the dpo section, preference.py)
    objective: str = _field("sft", choices=OBJECTIVES)

    def _validate(self):
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise _bad("train.micro_batch_size", f"must divide train.batch_size ({self.batch_size}), "
                                                 f"got {self.micro_batch_size}")
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise _bad("train.warmup_steps", f"must be less than train.steps ({self.steps}), got {self.warmup_steps}")

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection(_Section):
    _section = "lora"
    enabled: bool = False
    rank: int = _field(16, gt=0)
    alpha: float = _field(32.0, gt=0)  # adapter output is scaled by alpha / rank
    dropout: float = _field(0.0, ge=0, lt=1)
    targets: tuple[str, ...] = _field(LORA_TARGETS, choices=LORA_TARGETS, item="target")
    # QLoRA: the frozen base's targeted kernels stored NF4 or INT8 (bitsandbytes' formats, quant_base.py)
    quantize_base: str = _field("none", choices=("none", "nf4", "int8"))
    double_quant: bool = False  # NF4's block absmaxes quantised once more (8 bits, blocks of 256)

    def _validate(self):
        _check_list(self, "targets", allow_empty=False)
        if self.double_quant and self.quantize_base != "nf4":
            raise _bad("lora.double_quant", f"quantises NF4's block scales; it needs lora.quantize_base: nf4, "
                                            f"not {self.quantize_base}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection(_Section):
    _section = "checkpoint"
    every: int = _field(0, ge=0)  # 0 = only at the end
    keep: int = _field(3, gt=0)
    async_save: bool = True


MESH_AXES = ("data", "fsdp", "tensor", "sequence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection(_Section):
    """Device mesh shape; -1 on one axis means 'all remaining devices'."""

    _section = "mesh"
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    # attention when mesh.sequence > 1 (context_parallel.py): ring, ulysses or XLA's all-gather
    context_parallel: str = _field("ring", choices=CONTEXT_PARALLEL)

    def _validate(self):
        fill = None
        for axis in MESH_AXES:
            v = getattr(self, axis)
            if v == 0 or v < -1:
                raise _bad(f"mesh.{axis}", f"expected a positive int or -1 (all remaining devices), got {v}")
            if v == -1:
                if fill:
                    raise _bad(f"mesh.{axis}", f"only one mesh axis may be -1; mesh.{fill} already is")
                fill = axis

    @property
    def shape(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Section(_Section):
    _section = "fp8"
    enabled: bool = False
    recipe: str = _field("delayed", choices=FP8_RECIPES)
    amax_history: int = _field(1024, gt=0)
    margin: int = _field(0, ge=0)
    targets: tuple[str, ...] = _field(FP8_DEFAULT_TARGETS, choices=FP8_TARGETS, item="target")
    shared_scales: bool = True
    store_base: bool = False
    quantize_grads: bool = True
    distill: bool = False  # quantisation-aware distillation from the unquantised starting model

    def _validate(self):
        _check_list(self, "targets", allow_empty=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpoSection(_Section):
    """Direct preference optimisation (train.objective: dpo): the loss of each pair is
    -log sigmoid(beta * margin), smoothed towards the opposite label by label_smoothing (cDPO)."""

    _section = "dpo"
    beta: float = _field(0.1, gt=0)
    label_smoothing: float = _field(0.0, ge=0, lt=0.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
    output_dir: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    fp8: Fp8Section = dataclasses.field(default_factory=Fp8Section)
    dpo: DpoSection = dataclasses.field(default_factory=DpoSection)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "RunConfig":
        return config_from_dict(d, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- building from dicts ------------------------------------------------------------------------------


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _leaf_paths(cls=RunConfig, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp, path = _hints(cls)[f.name], _join(prefix, f.name)
        out += _leaf_paths(tp, path) if _is_section(tp) else [path]
    return out


def _unknown_key(cls, key, prefix: str) -> _ConfigError:
    path = _join(prefix, key)
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        hint = f" — did you mean {_join(prefix, close[0])}?"
    else:  # the right key in the wrong section (train.rank -> lora.rank)
        leaves = {p.rsplit(".", 1)[-1]: p for p in reversed(_leaf_paths()) if p != path}
        close = difflib.get_close_matches(str(key), leaves, n=1, cutoff=0.75)
        hint = f" — did you mean {leaves[close[0]]}?" if close else f" (expected one of {', '.join(names)})"
    return _ConfigError(f"unknown key {path}{hint}", path)


def _scan(cls, data, prefix: str, missing: list[str]):
    """Raise on the first unknown key (file order); collect missing required keys over the whole tree."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return  # reported with its type when the section is built
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
    for name, f in fields.items():
        tp = _hints(cls)[name]
        if _is_section(tp):
            if name in data or _required(f):
                _scan(tp, data.get(name), _join(prefix, name), missing)
        elif _required(f) and name not in data:
            missing.append(_join(prefix, name))


def _build(cls, data: Mapping, prefix: str):
    missing: list[str] = []
    _scan(cls, data, prefix, missing)
    if missing:
        s = "s" if len(missing) > 1 else ""
        raise _ConfigError(f"missing required key{s} {', '.join(missing)}", missing[0])
    kwargs = dict(data)
    for f in dataclasses.fields(cls):  # required sections with no required keys of their own (model)
        if _is_section(_hints(cls)[f.name]) and _required(f) and f.name not in kwargs:
            kwargs[f.name] = {}
    return cls(**kwargs)


def _parent(path: str) -> str:
    m = re.fullmatch(r"(.*)(\.[^.\[\]]+|\[\d+\])", path)
    return m.group(1) if m else ""


def _from_raw(data, source: str, where: dict[str, str], overrides: Sequence[str]) -> RunConfig:
    """`where` maps key paths (and list items, `data.train[1]`) to 'file:line'; overrides add '--set ...'."""

    def locate(path: str) -> str:
        while path:
            if path in where:
                return where[path]
            path = _parent(path)
        return source

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    if isinstance(overrides, str):
        overrides = [overrides]
    for s in overrides:
        _apply_override(data, s, where, locate)
    try:
        return _build(RunConfig, data, "")
    except _ConfigError as e:
        raise UserError(f"{locate(e.loc)}: {e}") from None


def _apply_override(data: dict, s: str, where: dict[str, str], locate):
    label = f"--set {s}"
    key, eq, text = s.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UserError(f"{label}: expected key.path=value, e.g. train.lr=1e-5")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{label}: invalid YAML value ({getattr(e, 'problem', None) or e})") from None
    parts = key.split(".")
    cls, node = RunConfig, data
    for i, part in enumerate(parts):
        prefix, path = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"{label}: {_unknown_key(cls, part, prefix)}")
        tp = _hints(cls)[part]
        sub = tp if _is_section(tp) else None
        if i == len(parts) - 1:
            if sub is not None:
                first = dataclasses.fields(sub)[0].name
                raise UserError(f"{label}: {path} is a section; set one of its keys, e.g. {path}.{first}=...")
            node[part] = value
            for p in [p for p in where if p == path or p.startswith((path + ".", path + "["))]:
                del where[p]
            where[path] = label
            return
        if sub is None:
            raise UserError(f"{label}: {path} is a value, not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UserError(f"{locate(path)}: {path}: expected a section (a mapping of keys), got {_show(child)}")
        cls, node = sub, child


def config_from_dict(d: Mapping, source: str = "config") -> RunConfig:
    """A RunConfig from plain dicts (e.g. a config saved with a checkpoint); errors are prefixed by `source`."""
    return _from_raw(d, source, {}, ())


# --- YAML -----------------------------------------------------------------------------------------------


def _key_lines(node, prefix: str, lines: dict[str, int], source: str):
    """Record the line of every key and list item; refuse duplicate keys (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            path, line = _join(prefix, k.value), k.start_mark.line + 1
            if path in seen:
                raise UserError(f"{source}:{line}: duplicate key {path} (first set on line {seen[path]})")
            seen[path] = lines[path] = line
            _key_lines(v, path, lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}[{i}]", lines, source)


def _read_yaml(text: str, source: str) -> tuple[object, dict[str, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, source)
    return data, lines


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.path=value` overrides (value parsed as YAML) in order, validate."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{source}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise UserError(f"{source}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{source}: cannot read config ({e.strerror})") from None
    data, lines = _read_yaml(text, source)
    where = {p: f"{source}:{line}" for p, line in lines.items()}
    return _from_raw(data, source, where, overrides)


def model_config_for(cfg) -> ModelConfig:
    """The architecture a run config names (its checkpoint's, from metadata alone, or its preset), in
    the run's dtypes."""
    from nemo_jax import checkpoint  # JAX and orbax: only when a run starts, not to read its YAML

    config = checkpoint.load_config(cfg.model.checkpoint) if cfg.model.checkpoint else preset(cfg.model.preset)
    return config.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
