"""The committed `make demo` data (data/demo/) equals a fresh run of scripts/make_demo_data.py, and every
conversation in it is a valid Mistral V3 Tekken fine-tuning conversation (mistral-common) of at most 256 tokens."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(gen):
    return gen.load_mistral_tokenizer()


def _records(name):
    return [json.loads(line) for line in (DEMO / name).read_text(encoding="utf-8").splitlines()]


def test_committed_files_equal_a_fresh_generation(gen, tok, tmp_path):
    files = gen.build(tok)  # also encodes every conversation with mistral-common (raises if one is invalid)
    assert sorted(files) == sorted(gen.FILES)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in gen.FILES:
        assert (DEMO / name).is_file(), f"data/demo/{name} missing: run python scripts/make_demo_data.py"
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), (
            f"data/demo/{name} differs from a fresh generation: run python scripts/make_demo_data.py")


def test_every_conversation_encodes_with_mistral_common(gen, tok):
    for name in ("tools_train.jsonl", "tools_eval.jsonl"):
        records = _records(name)
        assert len(records) == gen.COUNTS[name.removesuffix(".jsonl")]
        for i, rec in enumerate(records):
            assert set(rec) == {"messages", "tools"}, (name, i)
            gen.check_structure(rec)
            n = len(gen.encode_conversation(tok, rec))
            assert n <= gen.MAX_TOKENS, (name, i, n)


def test_pretraining_documents(gen, tok):
    tekken = tok.instruct_tokenizer.tokenizer
    for name in ("pretrain_train.jsonl", "pretrain_eval.jsonl"):
        records = _records(name)
        assert len(records) == gen.COUNTS[name.removesuffix(".jsonl")]
        for rec in records:
            assert set(rec) == {"text"}
            n = len(tekken.encode(rec["text"], bos=True, eos=True))
            assert gen.DOC_MIN_TOKENS <= n <= gen.DOC_MAX_TOKENS, (name, n, rec["text"][:80])


def test_eval_records_are_not_train_records():
    for kind in ("pretrain", "tools"):
        train = set((DEMO / f"{kind}_train.jsonl").read_text(encoding="utf-8").splitlines())
        eval_ = (DEMO / f"{kind}_eval.jsonl").read_text(encoding="utf-8").splitlines()
        assert not train.intersection(eval_), kind
        assert len(set(eval_)) == len(eval_), kind


def test_demo_data_stays_small():
    assert sum(p.stat().st_size for p in DEMO.glob("*.jsonl")) < 3_000_000


def test_call_ids_count_the_calls_of_each_conversation():
    # The ids are counted, not drawn (make_demo_data.call_id): each conversation's calls are call00001,
    # call00002, ... in order, and every tool result answers the call before it with that id.
    for name in ("tools_train.jsonl", "tools_eval.jsonl"):
        for i, rec in enumerate(_records(name)):
            ids = [c["id"] for m in rec["messages"] for c in m.get("tool_calls", [])]
            assert ids == [f"call{n:05d}" for n in range(1, len(ids) + 1)], (name, i, ids)
            results = [m["tool_call_id"] for m in rec["messages"] if m["role"] == "tool"]
            assert results == ids, (name, i)


def test_base_corpus_is_deterministic_and_its_values_come_from_the_requests(gen, tok):
    """`make demo-base`'s corpus: the documented mix, the very bytes data/demo/base/ was trained on, and in every
    tool log each free-text argument is spelled out in its request (what makes the base learn to copy), but for
    the known quirks make_demo_data._random_value_log documents (mostly a parallel translation's second call)."""
    data = gen.build_base_corpus(tok)
    assert hashlib.sha256(data).hexdigest() == gen.BASE_CORPUS_SHA256
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    c = gen.BASE_COUNTS
    assert len(texts) == c["docs"] + gen.COUNTS["pretrain_train"] + c["random_value_logs"] + c["copy_drills"]
    shipped = {r["text"] for r in _records("pretrain_train.jsonl")}
    assert shipped <= set(texts)  # pretrain_train's documents are the first of the 12000
    phrases = {v for row in gen.PHRASES for v in row.values()}
    checked = quirks = translation_quirks = 0
    for text in texts:
        lines = text.split("\n")
        for request, call in zip(lines, lines[1:]):
            if not call.startswith('[{"name"'):
                continue
            for i, c_ in enumerate(json.loads(call)):
                for k, v in c_["arguments"].items():
                    if k in gen.COPY_KEYS:
                        checked += 1
                        if v not in request:
                            quirks += 1
                            translation_quirks += i == 1 and c_["name"] == "translate" and v in phrases
    assert checked > 40000 and quirks / checked < 0.05 and translation_quirks / quirks > 0.9


def test_shipped_base_is_the_demo_preset():
    from nemo_jax.checkpoint import load_config
    from nemo_jax.config import preset

    assert load_config(str(DEMO / "base")) == preset("demo")
