"""Where training records come from, and every record format normalised to the two the tokenizer knows.

Sources (`data.train` / `data.eval` entries, `eval.py --data`)
    data/x.jsonl, data/dir, 'data/**/*.parquet'    .jsonl / .json / .parquet files, a directory or a glob
    data/saved                                    a `datasets` save_to_disk directory (a Dataset, or a
                                                  DatasetDict: its "train" split or its only one)
    hf:org/name[@revision][/subset][:split]       a dataset repo on the Hugging Face Hub (default split:
                                                  train, or the only one)
and in YAML the same as a mapping, which can also map a dataset's field names:

    - {path: data/dialogs.jsonl, columns: {messages: dialog}, weight: 2}
    - {path: hf:HuggingFaceH4/ultrachat_200k, split: train_sft, revision: <commit>}

A Hub dataset is resolved with huggingface_hub's snapshot_download(repo_type="dataset") (cache, token,
offline mode and progress bars as for models, nemo_jax/hub.py). Only the requested split's files are
downloaded when the repo's README declares its files (`configs:`, as most do); otherwise its data files
are, and `datasets` infers the splits from their names as `load_dataset` would. Its parquet / jsonl
files are then read like local ones; a saved dataset's Arrow files too.

Record formats (`normalize`, the one place, before tokenisation; the tokenizer and packer only ever
see the first two)
    {"text": str}                                        pretraining: every token trained
    {"messages": [...], "tools": [...]}                   chat, V3 Tekken; only assistant turns trained
    {"prompt": str | [msgs], "completion": str | [msgs]} a user prompt and the assistant answer (string
                                                         prompts are a user turn); the prompt's own
                                                         assistant turns are context (weight 0)
    {"conversations": [{"from": "human", "value": ..}]}   ShareGPT: human/user, gpt/assistant, system,
                                                         tool/observation; an assistant value (or a
                                                         function_call turn) that is a JSON call
                                                         {"name", "arguments"} (or a list) is a tool call
    {"instruction": .., "input": .., "output": ..}        Alpaca (input and a top-level system optional)
`columns` renames fields first ({canonical name: the record's field}), so any dataset whose fields hold
one of these shapes can be used as it is. Fields stored as JSON strings (parquet) are decoded; keys
with null values inside messages (parquet structs) are dropped. A record fitting no format raises
UserError(reason); data.py adds `file:line`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping

from nemo_jax.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".parquet")
SAVED_EXTENSION = ".arrow"  # the files of a datasets.save_to_disk directory
FIELDS = ("text", "messages", "tools", "prompt", "completion", "conversations", "instruction", "input", "output",
          "system", "chosen", "rejected")  # the last two: preference pairs (preference.py)
SOURCE_KEYS = ("path", "weight", "columns", "split", "subset", "revision")


# ---- sources -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One data source: a path / glob / saved dataset / `hf:` repo, its mixture weight and field mapping."""

    path: str
    weight: float = 1.0
    columns: tuple[tuple[str, str], ...] = ()  # (canonical field, the records' field)
    split: str | None = None  # hf: and saved DatasetDicts
    subset: str | None = None  # hf: (a dataset's "config")
    revision: str | None = None  # hf:

    def to_dict(self) -> dict:
        out = {"path": self.path}
        if self.weight != 1.0:
            out["weight"] = self.weight
        if self.columns:
            out["columns"] = dict(self.columns)
        out.update({k: getattr(self, k) for k in ("split", "subset", "revision") if getattr(self, k) is not None})
        return out

    @property
    def name(self) -> str:
        """An eval split's name: the path's stem (as for a plain path), then the split if one is given."""
        stem = os.path.splitext(os.path.basename(self.path.rstrip("/")))[0]
        return f"{stem}:{self.split}" if self.split else stem

    def __str__(self) -> str:  # how messages name the source (its weight is reported beside it)
        return self.path + "".join(f" {k}={v}" for k, v in self.to_dict().items() if k not in ("path", "weight"))


def source_from_mapping(m: Mapping) -> DataSource:
    """A DataSource from a YAML mapping entry; UserError naming the offending key."""
    for k in m:
        if k not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1)
            hint = f" — did you mean {close[0]}?" if close else f" (expected {', '.join(SOURCE_KEYS)})"
            if len(m) == 1 and "path" not in m:
                hint = " (write 'path:weight' with no space after the colon, or {path: ..., weight: ...})"
            raise UserError(f"unknown key {k!r} in a data source{hint}")
    path = m.get("path")
    if not isinstance(path, str) or not path:
        raise UserError(f"a data source mapping needs path: (a non-empty string), got {path!r}")
    weight = m.get("weight", 1.0)
    if isinstance(weight, str):
        try:
            weight = float(weight)
        except ValueError:
            pass
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
        raise UserError(f"{path}: weight must be a positive number, got {weight!r}")
    columns = m.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise UserError(f"{path}: columns must map field names, e.g. {{messages: dialog}}, got {columns!r}")
    for k, v in columns.items():
        if k not in FIELDS:
            close = difflib.get_close_matches(str(k), FIELDS, n=1)
            raise UserError(f"{path}: columns: unknown field {k!r}" + (f" — did you mean {close[0]}?" if close else
                            f" (the fields are {', '.join(FIELDS)})"))
        if not isinstance(v, str) or not v:
            raise UserError(f"{path}: columns.{k}: expected the records' field name, got {v!r}")
    extra = {}
    for k in ("split", "subset", "revision"):
        v = m.get(k)
        if v is not None and (not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == ""):
            raise UserError(f"{path}: {k} must be a non-empty string, got {v!r}")
        extra[k] = None if v is None else str(v)
    return DataSource(path, float(weight), tuple((str(k), v) for k, v in columns.items()), **extra)


def as_source(spec) -> DataSource:
    """A DataSource for a plain path (no weight parsing: see data.parse_source) or a DataSource."""
    return spec if isinstance(spec, DataSource) else DataSource(os.fspath(spec))


_HF = re.compile(r"hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^/:]+))?(?:/(?P<subset>[^:]+))?"
                 r"(?::(?P<split>[^:]+))?")


def parse_hf(source: DataSource) -> tuple[str, str | None, str | None, str | None]:
    """(repo, revision, subset, split) of an `hf:` source; the mapping's keys fill in or must agree."""
    m = _HF.fullmatch(source.path)
    if not m:
        raise UserError(f"{source.path}: expected hf:org/name[@revision][/subset][:split]")
    parts = m.groupdict()
    for k in ("revision", "subset", "split"):
        given = getattr(source, k)
        if given is not None and parts[k] is not None and given != parts[k]:
            raise UserError(f"{source.path}: {k} {given!r} disagrees with the path's {parts[k]!r}")
        parts[k] = parts[k] or given
    return parts["repo"], parts["revision"], parts["subset"], parts["split"]


def source_files(path: str) -> list[str]:
    """The data files a path, directory or glob stands for, sorted."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f) and f.endswith(EXTENSIONS))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(EXTENSIONS)
        )
    elif os.path.isfile(path):
        if not path.endswith(EXTENSIONS):
            raise UserError(f"{path}: unsupported data file type, expected one of {', '.join(EXTENSIONS)}")
        files = [path]
    else:
        raise UserError(f"{path}: no such data file or directory")
    if not files:
        raise UserError(f"{path}: no {'/'.join(EXTENSIONS)} files found")
    return files


def resolve(source) -> list[str]:
    """The files to read for a source (a DataSource or a plain path), in order."""
    source = as_source(source)
    if source.path.startswith("hf:"):
        return _hub_files(source)
    saved = _saved_files(source)
    if saved is not None:
        return saved
    if source.split or source.subset or source.revision:
        raise UserError(f"{source.path}: split/subset/revision apply to hf: datasets and saved DatasetDicts only")
    return source_files(source.path)


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A data file of a Hub dataset repo that is listed but not yet downloaded (streamed sources)."""

    name: str  # its path in the repo
    spec: str
    repo: str
    revision: str | None

    def local(self) -> str:
        """Download it (or find it in the Hugging Face cache): its local path."""
        from nemo_jax import hub

        path = hub.dataset_file(self.spec, self.repo, self.revision, self.name)
        if path is None:
            raise UserError(f"{self.spec}: {self.name}: listed in the repo but cannot be downloaded")
        return str(path)


def stream_files(source) -> list:
    """The files to read for a streamed source, in order: as `resolve`, except that an hf: source whose
    dataset card declares its files is listed, not downloaded: each is a RemoteFile, fetched when the
    reader reaches it. Without a card's declaration, or without a listing (offline and not cached), the
    split is downloaded as `resolve` does."""
    from nemo_jax import hub

    source = as_source(source)
    if not source.path.startswith("hf:"):
        return resolve(source)
    card = _card(source)
    spec, repo, revision, _, split, declared = card
    with hub.hub_errors(spec, repo, revision, kind="dataset"):
        listing = hub.repo_files(repo, revision, "dataset") if declared is not None else None
    if listing is None:
        return _hub_files(source, card)
    split = _pick_split(spec, split, declared)
    # fnmatch's `*` also crosses `/`: the card's patterns (data/train-*) then match as huggingface_hub's do
    files = sorted(f for f in listing if any(fnmatch.fnmatchcase(f, p) for p in declared[split]))
    return [RemoteFile(f, spec, repo, revision) for f in _checked(spec, files, split)]


def _pick_split(what: str, split: str | None, splits) -> str:
    splits = list(splits)
    if split is None:
        if "train" in splits or len(splits) == 1:
            return "train" if "train" in splits else splits[0]
        raise UserError(f"{what}: several splits ({', '.join(splits)}); name one ({what}:SPLIT, or split: in YAML)")
    if split not in splits:
        raise UserError(f"{what}: no split {split!r} (it has {', '.join(splits) or 'none'})")
    return split


def _saved_files(source: DataSource) -> list[str] | None:
    """The Arrow files of a datasets.save_to_disk directory (None if the path is not one)."""
    path = source.path
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        path = os.path.join(path, _pick_split(source.path, source.split, splits))
    elif source.split is not None and os.path.isfile(os.path.join(path, "state.json")):
        raise UserError(f"{source.path}: a saved Dataset has no splits (split: {source.split})")
    state = os.path.join(path, "state.json")
    if not (os.path.isfile(state) and os.path.isfile(os.path.join(path, "dataset_info.json"))):
        return None
    with open(state) as f:
        files = [os.path.join(path, d["filename"]) for d in json.load(f).get("_data_files", [])]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise UserError(f"{missing[0] if missing else state}: {'file not found' if missing else 'no data files'} "
                        "(a datasets.save_to_disk directory)")
    return files


def _card(source: DataSource):
    """(spec, repo, revision, subset, split, {split: patterns} the dataset card declares, or None)."""
    from nemo_jax import hub

    repo, revision, subset, split = parse_hf(source)
    readme = hub.dataset_file(source.path, repo, revision, "README.md")
    return source.path, repo, revision, subset, split, _declared_files(readme, subset, source.path) if readme else None


def _checked(spec: str, files: list, split: str) -> list:
    bad = [f for f in files if not f.endswith(EXTENSIONS)]
    if bad:
        raise UserError(f"{spec}: {os.path.basename(bad[0])}: only {'/'.join(EXTENSIONS)} data files are read")
    if not files:
        raise UserError(f"{spec}: no data files for split {split!r}")
    return files


def _hub_files(source: DataSource, card=None) -> list[str]:
    """The split's files, downloaded (`card`: _card(source), if already read)."""
    from nemo_jax import hub

    spec, repo, revision, subset, split, declared = card or _card(source)
    if declared is not None:  # only the split's own files
        split = _pick_split(spec, split, declared)
        patterns = declared[split]
        root = hub.download_dataset(spec, repo, revision, patterns + ["README.md"])
        files = sorted({f for p in patterns for f in glob.glob(os.path.join(root, p), recursive=True)
                        if os.path.isfile(f)})
    else:  # no declared files: take the data files, let datasets infer the splits from their names
        root = hub.download_dataset(spec, repo, revision, [f"*{e}" for e in EXTENSIONS] + ["README.md"])
        import datasets

        try:
            builder = datasets.load_dataset_builder(str(root), name=subset)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        data_files = builder.config.data_files or {}
        split = _pick_split(spec, split, data_files)
        files = sorted(str(f) for f in data_files[split])
    return _checked(spec, files, split)


def _declared_files(readme, subset: str | None, spec: str) -> dict[str, list[str]] | None:
    """{split: [patterns]} of a dataset card's `configs:` entry for `subset`; None if it declares none."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        card = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return None
    configs = card.get("configs") if isinstance(card, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    names = [c.get("config_name", "default") for c in configs if isinstance(c, dict)]
    if subset is None:
        defaults = [c for c in configs if isinstance(c, dict) and c.get("default")]
        if len(names) > 1 and not defaults and "default" not in names:
            raise UserError(f"{spec}: several subsets ({', '.join(names)}); name one (hf:org/name/SUBSET)")
        config = defaults[0] if defaults else next(c for c in configs if c.get("config_name", "default") in
                                                   ("default", names[0]))
    else:
        config = next((c for c in configs if isinstance(c, dict) and c.get("config_name") == subset), None)
        if config is None:
            raise UserError(f"{spec}: no subset {subset!r} (it has {', '.join(names)})")
    data_files = config.get("data_files")
    if data_files is None:
        return None
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                    and isinstance(data_files[0], dict)):
        return {"train": [data_files] if isinstance(data_files, str) else list(data_files)}
    out = {}
    for entry in data_files if isinstance(data_files, list) else []:
        paths = entry.get("path")
        out.setdefault(str(entry.get("split", "train")), []).extend([paths] if isinstance(paths, str) else paths)
    return out or None


# ---- record formats ----------------------------------------------------------------------------


def rename_columns(rec: dict, columns=()) -> dict:
    """A record with each (canonical, field) pair of `columns` applied: rec[field] moved to rec[canonical]."""
    if not columns:
        return rec
    rec = dict(rec)
    values = {canonical: rec.pop(field, None) for canonical, field in columns}
    rec.update({k: v for k, v in values.items() if v is not None})
    return rec


def normalize(rec, columns=()) -> dict:
    """One record -> {"text": str} or {"messages": list, "tools": list | None}; UserError(reason) if it fits
    no format (module docstring)."""
    if not isinstance(rec, dict):
        raise UserError(f"a record must be a JSON object, got {type(rec).__name__}")
    rec = rename_columns(rec, columns)
    get = lambda k: rec.get(k)  # noqa: E731
    if get("chosen") is not None and get("rejected") is not None:  # preference.py reads these
        raise UserError("a preference pair ('chosen' / 'rejected') is training data for train.objective: dpo")
    if get("text") is not None and get("messages") is not None:
        raise UserError("a record has either 'text' or 'messages', not both")
    tools = _json_list(rec, "tools")
    if get("messages") is not None:
        return {"messages": _messages(_json_list(rec, "messages")), "tools": tools}
    if get("conversations") is not None:
        return {"messages": _sharegpt(_json_list(rec, "conversations"), get("system")), "tools": tools}
    if get("prompt") is not None or get("completion") is not None:
        return {"messages": _prompt_completion(rec), "tools": tools}
    if get("instruction") is not None or get("output") is not None:
        return {"messages": _alpaca(rec), "tools": tools}
    if get("text") is not None:
        if not isinstance(rec["text"], str):
            raise UserError(f"'text' must be a string, got {type(rec['text']).__name__}")
        return {"text": rec["text"]}
    raise UserError("a record needs 'text' or 'messages' (or 'prompt' + 'completion', ShareGPT 'conversations', "
                    f"Alpaca 'instruction' + 'output'; `columns:` maps other names); found keys {sorted(rec)}")


def _json_list(rec: dict, key: str):
    """rec[key] as a list (decoded if it is a JSON string, as parquet stores nested data); None if absent."""
    v = rec.get(key)
    if isinstance(v, str):
        try:
            decoded = json.loads(v)
        except ValueError:
            decoded = v
        v = decoded if isinstance(decoded, list) else v
    if v is not None and not isinstance(v, list):
        raise UserError(f"'{key}' must be a list, got {type(v).__name__}")
    return v


def _messages(msgs: list) -> list:
    """Messages without the null-valued keys parquet gives every struct field a row does not use."""
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in msgs]


def _string(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise UserError(f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _turns(rec: dict, key: str, role: str) -> list:
    v = rec.get(key)
    if v is None:
        raise UserError(f"a record with 'prompt' needs 'completion' too (and the reverse); found keys {sorted(rec)}")
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    return _messages(_json_list(rec, key))


def _prompt_completion(rec: dict) -> list:
    prompt = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m
              for m in _turns(rec, "prompt", "user")]  # context, not trained
    return prompt + _turns(rec, "completion", "assistant")


def _alpaca(rec: dict) -> list:
    instruction, output = _string(rec, "instruction"), _string(rec, "output")
    extra = rec.get("input")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"'input' must be a string, got {type(extra).__name__}")
    system = [{"role": "system", "content": _string(rec, "system")}] if rec.get("system") else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def _sharegpt(turns: list, system) -> list:
    msgs = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    open_calls: list[dict] = []  # tool calls of the last assistant turn that await results, in order
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise UserError(f"conversations[{i}]: must be an object, got {type(t).__name__}")
        who, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(who)
        if role is None:
            raise UserError(f"conversations[{i}]: unknown speaker {who!r} (expected "
                            f"{', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise UserError(f"conversations[{i}]: value must be a string, got {type(value).__name__}")
        calls = _as_calls(value, i) if role == "assistant" else None
        if who == "function_call" and calls is None:
            raise UserError(f"conversations[{i}]: a function_call must be a JSON {{\"name\", \"arguments\"}} call")
        if calls:
            msgs.append({"role": "assistant", "tool_calls": calls})
            open_calls = list(calls)
        elif role == "tool":
            if not open_calls:
                raise UserError(f"conversations[{i}]: a {who} turn answers no tool call (the assistant turn "
                                "before it must be a JSON call {\"name\", \"arguments\"})")
            call = open_calls.pop(0)
            msgs.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                         "content": value})
        else:
            msgs.append({"role": role, "content": value})
    return msgs


def _as_calls(value: str, turn: int) -> list[dict] | None:
    """A ShareGPT assistant value that is a JSON tool call (or a list of them) as tool_calls, else None."""
    s = value.strip()
    if not s.startswith(("{", "[")):
        return None
    try:
        v = json.loads(s)
    except ValueError:
        return None
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c
                            for c in items):
        return None
    calls = []
    for k, c in enumerate(items):
        args = c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"], ensure_ascii=False)
        # V3 tool calls need 9-character ids; ShareGPT has none: derive them from the turn and the call
        call_id = hashlib.sha1(f"{turn}:{k}:{c['name']}:{args}".encode()).hexdigest()[:9]
        calls.append({"id": call_id, "type": "function", "function": {"name": c["name"], "arguments": args}})
    return calls
