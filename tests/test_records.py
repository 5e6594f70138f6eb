"""Data sources and record formats (nemo_jax/records.py): every format normalised to text / messages before
tokenisation (the tokenizer's own encoding of the normal form is the reference), per-source field
mappings from YAML, `datasets` save_to_disk directories, and Hub dataset repos from offline hub caches
built here (README-declared splits, inferred splits, subsets, revisions)."""

import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_jax import load_tokenizer
from nemo_jax.data import load_documents, make_train_iterator
from nemo_jax.errors import UserError
from nemo_jax.records import DataSource, normalize, resolve
from nemo_jax.run_config import load_config
from hubcache import add_repo, commit_for, offline_hub

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def user(c):
    return {"role": "user", "content": c}


def bot(c, **kw):
    return {"role": "assistant", "content": c, **kw}


CALL = {"name": "get_weather", "arguments": {"city": "Lyon"}}
CALL_ID = normalize({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": json.dumps(CALL)}]}
                    )["messages"][1]["tool_calls"][0]["id"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]

FORMATS = {
    "text": ({"text": "plain text"}, {"text": "plain text"}),
    "messages+tools": ({"messages": [user("a"), bot("b")], "tools": TOOLS},
                       {"messages": [user("a"), bot("b")], "tools": TOOLS}),
    "prompt/completion strings": ({"prompt": "Capital of France?", "completion": "Paris."},
                                  {"messages": [user("Capital of France?"), bot("Paris.")], "tools": None}),
    "prompt/completion chat lists": (
        {"prompt": [{"role": "system", "content": "s"}, user("1"), bot("2"), user("3")], "completion": [bot("4")]},
        {"messages": [{"role": "system", "content": "s"}, user("1"), bot("2", weight=0), user("3"), bot("4")],
         "tools": None}),
    "sharegpt": ({"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "hello"}]},
                 {"messages": [{"role": "system", "content": "be brief"}, user("hi"), bot("hello")], "tools": None}),
    "sharegpt tool call": (
        {"conversations": [{"from": "human", "value": "Weather in Lyon?"}, {"from": "gpt", "value": json.dumps(CALL)},
                           {"from": "tool", "value": '{"temp": 21}'}, {"from": "gpt", "value": "21 °C."}],
         "tools": json.dumps(TOOLS)},
        {"messages": [user("Weather in Lyon?"),
                      {"role": "assistant", "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
                          "name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
                      {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": '{"temp": 21}'},
                      bot("21 °C.")], "tools": TOOLS}),
    "alpaca": ({"instruction": "Translate", "input": "chat", "output": "cat", "text": "### Instruction: ..."},
               {"messages": [user("Translate\n\nchat"), bot("cat")], "tools": None}),
    "alpaca without input": ({"instruction": "Say hi", "input": "", "output": "hi"},
                             {"messages": [user("Say hi"), bot("hi")], "tools": None}),
    "parquet structs and JSON strings": (
        {"messages": json.dumps([{"role": "user", "content": "a", "tool_calls": None}, bot("b", weight=None)])},
        {"messages": [user("a"), bot("b")], "tools": None}),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_normalises_to_text_or_messages(name):
    record, expected = FORMATS[name]
    assert normalize(record) == expected
    assert len(CALL_ID) == 9 and CALL_ID.isalnum()  # what V3 tool-call ids must be


def test_formats_tokenize_as_their_normal_form(tok, tmp_path):
    """One file mixing every format: each document is the tokenizer's encoding of its normal form."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in FORMATS.values()))
    docs = load_documents(str(path), tok, cache_dir=str(tmp_path / "cache"))
    for i, (_, norm) in enumerate(FORMATS.values()):
        ids = tok.encode(norm["text"], True, True) if "text" in norm else tok.encode_chat(norm["messages"],
                                                                                          norm["tools"])[0]
        assert docs.get(i)[0].tolist() == ids


def test_columns_map_other_field_names(tok, tmp_path):
    path = tmp_path / "dialogs.jsonl"
    path.write_text(json.dumps({"dialog": [user("a"), bot("b")]}) + "\n"
                    + json.dumps({"q": "x", "a": "y"}) + "\n")
    assert normalize({"q": "x", "a": "y"}, (("prompt", "q"), ("completion", "a")))["messages"] == [user("x"), bot("y")]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text((ROOT / "configs/tiny.yaml").read_text().replace(
        "    - tests/fixtures/data/tiny_train.jsonl",
        f"    - {{path: {path}, columns: {{messages: dialog}}, weight: 2}}\n"
        f"    - {ROOT / 'tests/fixtures/data/tiny_train.jsonl'}:1"))
    cfg = load_config(cfg_file)
    assert cfg.data.train[0] == DataSource(str(path), 2.0, (("messages", "dialog"),))
    assert load_config(cfg_file, [f"output_dir={tmp_path}"]).to_dict()["data"]["train"][0] == {
        "path": str(path), "weight": 2.0, "columns": {"messages": "dialog"}}
    it = make_train_iterator(cfg.data.train, tok, 64, 2, 0, skip_bad_records=True, cache_dir=str(tmp_path / "cache"))
    mapped = it.sources[0]
    assert mapped.get(0)[0].tolist() == tok.encode_chat([user("a"), bot("b")])[0] and mapped.bad == 1
    assert "found keys ['a', 'q']" in mapped.bad_example  # record 2 does not fit the mapping: file:line: reason
    assert "dialogs.jsonl:2: " in mapped.bad_example


BAD = [
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"conversations\[0\]: unknown speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "r"}]},
     r"conversations\[1\]: a tool turn answers no tool call"),
    ({"prompt": "x"}, "a record with 'prompt' needs 'completion' too"),
    ({"instruction": "x", "output": 3}, "'output' must be a string, got int"),
    ({"conversations": "not a list"}, "'conversations' must be a list, got str"),
]


@pytest.mark.parametrize("record,error", BAD, ids=range(len(BAD)))
def test_bad_records_name_file_line_and_reason(tok, tmp_path, record, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2: {error}"):
        load_documents(str(path), tok, cache_dir=str(tmp_path / "cache"))


# ---- saved datasets and Hub dataset repos ----------------------------------------------------------

ROWS = {split: [{"messages": [user(f"{split} q{i}"), bot(f"{split} a{i}")], "prompt": f"{split} q{i}",
                 "prompt_id": str(i)} for i in range(3)] for split in ("train_sft", "test_sft")}  # ultrachat's shape


def first_user_turns(docs, tok):
    return [tok.decode(docs.get(i)[0].tolist(), keep_special=True).split("[/INST]")[0].split("[INST]")[-1].strip()
            for i in range(len(docs))]


def test_saved_datasets(tok, tmp_path):
    cache = str(tmp_path / "cache")
    datasets.Dataset.from_list(ROWS["train_sft"]).save_to_disk(str(tmp_path / "one"))
    assert first_user_turns(load_documents(str(tmp_path / "one"), tok, cache_dir=cache), tok) == [
        "train_sft q0", "train_sft q1", "train_sft q2"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["train_sft"]),
                               "test": datasets.Dataset.from_list(ROWS["test_sft"][:2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_documents(str(tmp_path / "dict"), tok, cache_dir=cache)) == 3  # "train" by default
    test = load_documents(DataSource(str(tmp_path / "dict"), split="test"), tok, cache_dir=cache)
    assert first_user_turns(test, tok) == ["test_sft q0", "test_sft q1"]
    with pytest.raises(UserError, match="dict: no split 'dev' \\(it has train, test\\)"):
        resolve(DataSource(str(tmp_path / "dict"), split="dev"))


def parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


CARD = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
- config_name: small
  data_files: small/*.jsonl
---
# A chat dataset
"""


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory):
    home = tmp_path_factory.mktemp("hubdata")
    add_repo(home, "org/chat", {"README.md": CARD,
                                "data/train_sft-00000-of-00001.parquet": parquet_bytes(ROWS["train_sft"]),
                                "data/test_sft-00000-of-00001.parquet": parquet_bytes(ROWS["test_sft"]),
                                "small/part.jsonl": json.dumps({"text": "small subset"}) + "\n"},
             repo_type="dataset")
    add_repo(home, "org/chat", {"README.md": CARD, "data/train_sft-00000-of-00001.parquet":
                                parquet_bytes(ROWS["train_sft"][:1]), "data/test_sft-0.parquet": b""},
             repo_type="dataset", revision="v0")
    # no dataset card: datasets infers the splits from the file names
    add_repo(home, "org/plain", {"train.jsonl": json.dumps({"text": "plain train"}) + "\n",
                                 "test.jsonl": json.dumps({"text": "plain test"}) + "\n"}, repo_type="dataset")
    return home


def test_hub_datasets_by_split_subset_and_revision(hub_data, tok, tmp_path, monkeypatch):
    offline_hub(monkeypatch, hub_data)
    cache = str(tmp_path / "cache")
    docs = load_documents("hf:org/chat:train_sft", tok, cache_dir=cache)
    assert first_user_turns(docs, tok) == ["train_sft q0", "train_sft q1", "train_sft q2"]
    files = resolve("hf:org/chat:test_sft")
    assert [Path(f).name for f in files] == ["test_sft-00000-of-00001.parquet"]
    assert f"datasets--org--chat/snapshots/{commit_for('org/chat@main')}/data/" in files[0]
    assert len(load_documents(DataSource("hf:org/chat@v0", split="train_sft"), tok, cache_dir=cache)) == 1
    small = load_documents("hf:org/chat/small", tok, cache_dir=cache)  # one split ("train"), from the card
    assert tok.decode(small.get(0)[0].tolist()).strip() == "small subset"
    plain = load_documents("hf:org/plain:test", tok, cache_dir=cache)
    assert tok.decode(plain.get(0)[0].tolist()).strip() == "plain test"
    assert resolve("hf:org/plain")[0].endswith("train.jsonl")  # "train" by default
    # a training mixture of a Hub split and a local file, as data.train lists them
    it = make_train_iterator(["hf:org/chat:train_sft:3", str(ROOT / "tests/fixtures/data/tiny_train.jsonl")],
                             tok, 64, 2, 0, cache_dir=cache)
    assert it.summary().splitlines()[0].startswith("hf:org/chat:train_sft: 3 documents") and "(weight 0.750)" in \
        it.summary()


@pytest.mark.parametrize("spec,error", [
    ("hf:org/chat", r"hf:org/chat: several splits \(train_sft, test_sft\); name one"),
    ("hf:org/chat:dev", r"hf:org/chat:dev: no split 'dev' \(it has train_sft, test_sft\)"),
    ("hf:org/chat/xx:train", r"no subset 'xx' \(it has default, small\)"),
    ("hf:org/missing:train", r"hf:org/missing:train: not found: .*HF_HUB_OFFLINE is set"),
    ("hf:nope", r"expected hf:org/name\[@revision\]\[/subset\]\[:split\]"),
])
def test_hub_dataset_errors_are_one_line(hub_data, monkeypatch, spec, error):
    offline_hub(monkeypatch, hub_data)
    with pytest.raises(UserError, match=error) as e:
        resolve(spec)
    assert "\n" not in str(e.value)
