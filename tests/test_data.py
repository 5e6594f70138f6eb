"""Data pipeline: reading and tokenizing sources, packing, shuffling, resumption, eval, bad data."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_jax import load_tokenizer
from nemo_jax.data import (
    Documents,
    EvalBatches,
    PackedIterator,
    load_documents,
    make_eval_batches,
    make_train_iterator,
    parse_source,
    tokenize_file,
)
from nemo_jax.errors import UserError

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return str(path)


def chat(user, answer, weight=None):
    a = {"role": "assistant", "content": answer, **({} if weight is None else {"weight": weight})}
    return {"messages": [{"role": "user", "content": user}, a]}


def synthetic_docs(lengths, start=1000):
    """Documents whose tokens are consecutive integers, unique across documents: a pair (x, y)
    belongs to a document exactly when y == x + 1 and both lie in one document's range."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n + 1  # a gap, so x + 1 never crosses into the next document
    return docs


def stream_pairs(batches):
    """Non-padding (token, target, mask) triples in row-major order."""
    out = []
    for b in batches:
        keep = b["segment_ids"] > 0
        out += list(zip(b["tokens"][keep].tolist(), b["targets"][keep].tolist(), b["loss_mask"][keep].tolist()))
    return out


def check_rows(batch):
    """Segments are 1, 2, ... then padding; positions count from 0 within each segment."""
    for seg, pos, tokens, targets in zip(batch["segment_ids"], batch["positions"], batch["tokens"], batch["targets"]):
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (pos[used:] == 0).all()
        starts = np.flatnonzero(np.diff(seg[:used], prepend=0))
        assert seg[:used][starts].tolist() == list(range(1, len(starts) + 1))
        for a, b in zip(starts, [*starts[1:], used]):
            assert pos[a:b].tolist() == list(range(b - a))
        assert (targets[:used] == tokens[:used] + 1).all()  # synthetic docs: the next token of the same doc


# ---- packing ----------------------------------------------------------------------------------


def test_packing_literal():
    """Whole docs fill a row; a doc longer than a row fills the rest and continues; padding is 0."""
    docs = Documents.from_lists(
        [[10, 11, 12, 13], [20, 21, 22], list(range(30, 42)), [50, 51]],
        [[0, 0, 1, 1], [1, 1, 1], [1] * 12, [0, 1]],
    )
    (b0, b1) = list(EvalBatches(docs, seq_len=8, batch_size=2, pad_id=-1))
    assert b0["tokens"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32], list(range(33, 41))]
    assert b0["targets"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33], list(range(34, 42))]
    assert b0["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert b0["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 3, 3], [1] * 8]
    assert b0["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert b1["tokens"].tolist() == [[50] + [-1] * 7, [-1] * 8]
    assert b1["targets"].tolist() == [[51] + [-1] * 7, [-1] * 8]
    assert b1["loss_mask"].tolist() == [[1] + [0] * 7, [0] * 8]
    assert b1["segment_ids"].tolist() == [[1] + [0] * 7, [0] * 8]
    assert all(b[k].dtype == (np.float32 if k == "loss_mask" else np.int32) for b in (b0, b1) for k in KEYS)


def test_doc_that_does_not_fit_starts_next_row():
    docs = Documents.from_lists([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]])  # 5 pairs, then 4 pairs
    (b,) = list(EvalBatches(docs, seq_len=8, batch_size=2))
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["tokens"][1, :4].tolist() == [7, 8, 9, 10]


def test_rows_hold_at_most_the_gpu_kernels_documents():
    """The 64th short document of a row starts the next row (config.MAX_DOCUMENTS_PER_ROW), in
    training and eval batches alike; no pair is lost."""
    from nemo_jax.config import MAX_DOCUMENTS_PER_ROW

    docs = synthetic_docs([3] * 150)  # 2 pairs each: 150 would fit a 512-token row 1.7 times over
    eval_batches = list(EvalBatches(Documents.from_lists(docs), seq_len=512, batch_size=1))
    train = PackedIterator([Documents.from_lists(docs)], 512, batch_size=3, seed=0)
    for batch in eval_batches + [next(train)]:
        check_rows(batch)
        assert batch["segment_ids"].max() <= MAX_DOCUMENTS_PER_ROW
    assert [int(b["segment_ids"].max()) for b in eval_batches] == [63, 63, 24]
    assert len(stream_pairs(eval_batches)) == 300


def test_epoch_has_every_pair_exactly_once():
    rng = np.random.default_rng(0)
    seq_len = 16
    lengths = [2, 17, 18, 33, 50, 3] + rng.integers(2, 3 * seq_len, 60).tolist()
    docs = synthetic_docs(lengths)
    it = PackedIterator([Documents.from_lists(docs)], seq_len, batch_size=3, seed=7)
    want = sorted((d[i], d[i + 1]) for d in docs for i in range(len(d) - 1))
    batches, seen = [], 0
    while seen < 2 * len(want):
        batches.append(next(it))
        check_rows(batches[-1])
        seen += int((batches[-1]["segment_ids"] > 0).sum())
    assert it.epoch == 2
    pairs = [(x, y) for x, y, _ in stream_pairs(batches)]
    first, second = pairs[: len(want)], pairs[len(want) : 2 * len(want)]
    assert sorted(first) == sorted(second) == want
    # shuffled, and reshuffled every epoch
    assert first != [p for d in docs for p in zip(d[:-1], d[1:])] and first != second


def test_resume_equals_uninterrupted():
    a = Documents.from_lists(synthetic_docs(np.random.default_rng(1).integers(2, 40, 30), start=1000))
    b = Documents.from_lists(synthetic_docs(np.random.default_rng(2).integers(2, 90, 9), start=10**6))
    make = lambda: PackedIterator([a, b], 24, 4, seed=3, weights=[3.0, 1.0])  # noqa: E731
    full = make()
    reference = [next(full) for _ in range(30)]
    for stop in (0, 1, 7, 19):
        it = make()
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.state()))
        resumed = make()
        next(resumed)  # a fresh iterator that has moved on elsewhere
        resumed.restore(state)
        for want in reference[stop:]:
            got = next(resumed)
            assert all((got[k] == want[k]).all() for k in KEYS)
    assert full.state()["epochs"][1] >= 2  # the run above crossed epochs of the small source


def test_restore_rejects_other_data():
    it = PackedIterator([Documents.from_lists(synthetic_docs([5, 6, 7]))], 8, 2, seed=0)
    other = PackedIterator([Documents.from_lists(synthetic_docs([5, 6]))], 8, 2, seed=0)
    with pytest.raises(UserError, match="data state is for"):
        other.restore(it.state())


def test_seed_decides_order():
    docs = Documents.from_lists(synthetic_docs(range(2, 60)))
    first = lambda seed: next(PackedIterator([docs], 32, 2, seed=seed))["tokens"]  # noqa: E731
    assert (first(5) == first(5)).all()
    assert not (first(5) == first(6)).all()


def test_mixture_weights():
    a = Documents.from_lists(synthetic_docs([5] * 50, start=1000))
    b = Documents.from_lists(synthetic_docs([5] * 50, start=10**6))
    it = PackedIterator([a, b], seq_len=4, batch_size=64, seed=0, weights=[3, 1])  # one doc per row
    tokens = np.concatenate([next(it)["tokens"][:, 0] for _ in range(40)])
    share = (tokens < 10**6).mean()
    assert 0.72 < share < 0.78


def test_process_shares_make_up_the_global_batch():
    docs = [Documents.from_lists(synthetic_docs(np.random.default_rng(4).integers(2, 50, 40)))]
    whole = PackedIterator(docs, 16, 8, seed=1)
    parts = [PackedIterator(docs, 16, 8, seed=1, process_index=i, process_count=4) for i in range(4)]
    for _ in range(5):
        want = next(whole)
        got = [next(p) for p in parts]
        for k in KEYS:
            assert (np.concatenate([g[k] for g in got]) == want[k]).all()
    with pytest.raises(UserError, match="split evenly"):
        PackedIterator(docs, 16, 6, seed=1, process_count=4)


def test_eval_every_doc_once_and_process_shares():
    lengths = np.random.default_rng(5).integers(2, 40, 37).tolist() + [100]
    docs_list = synthetic_docs(lengths)
    docs = Documents.from_lists(docs_list)
    ev = EvalBatches(docs, 16, 4)
    batches = list(ev)
    assert len(batches) == len(ev) and all(b["tokens"].shape == (4, 16) for b in batches)
    for b in batches:
        check_rows(b)
    pairs = [(x, y) for x, y, _ in stream_pairs(batches)]
    assert pairs == [p for d in docs_list for p in zip(d[:-1], d[1:])]  # file order, each once
    assert list(ev)[0]["tokens"].tolist() == batches[0]["tokens"].tolist()  # re-iterable
    shares = [list(EvalBatches(docs, 16, 4, process_index=i, process_count=2)) for i in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(batches)
    for i, b in enumerate(batches):
        assert (np.concatenate([shares[0][i]["tokens"], shares[1][i]["tokens"]]) == b["tokens"]).all()


# ---- files ------------------------------------------------------------------------------------

TEXTS = ["Hello world.", "", "Zürich 東京 👋🏽\r\n  code:\n\tpass", "long " * 300]
CHATS = [chat("Hi", "Hello!"), chat("2+2?", "4", weight=0), chat("Привет", "Здравствуйте")]


def expected_docs(tok, texts=TEXTS, chats=CHATS):
    docs = [(tok.encode(t, bos=True, eos=True), None) for t in texts]
    return docs + [tok.encode_chat(c["messages"]) for c in chats]


def test_jsonl_text_and_chat_records(tok, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)] + [""] + CHATS)
    batches = list(make_eval_batches(path, tok, 64, 2, cache_dir=str(tmp_path / "cache")))
    want = []
    for ids, mask in expected_docs(tok):
        mask = mask if mask is not None else [True] * len(ids)
        want += list(zip(ids[:-1], ids[1:], map(float, mask[1:])))
    assert stream_pairs(batches) == want
    assert sum(tok.eos_id == y for _, y, _ in want) == len(TEXTS) + len(CHATS)


def test_json_parquet_dirs_and_globs(tok, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    write_jsonl(tmp_path / "d" / "sub" / "b.json", CHATS)  # .json holding JSON lines
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d" / "sub" / "c.parquet")
    pq.write_table(
        pa.table({"messages": [json.dumps(c["messages"]) for c in CHATS], "tools": [None] * len(CHATS)}),
        tmp_path / "d" / "e.parquet",
    )
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    cache = str(tmp_path / "cache")
    docs = load_documents(str(tmp_path / "d"), tok, cache_dir=cache)
    want = [ids for ids, _ in expected_docs(tok)]
    texts, chats = want[: len(TEXTS)], want[len(TEXTS) :]
    # files in sorted order: a.json (texts), e.parquet (chats), sub/b.json (chats), sub/c.parquet (texts)
    assert [docs.get(i)[0].tolist() for i in range(len(docs))] == texts + chats + chats + texts
    globbed = load_documents(str(tmp_path / "d" / "**" / "*.parquet"), tok, cache_dir=cache)
    assert len(globbed) == len(TEXTS) + len(CHATS)


def test_parse_source():
    assert parse_source("data/a.jsonl:2.5") == ("data/a.jsonl", 2.5)
    assert parse_source("data/a.jsonl") == ("data/a.jsonl", 1.0)
    assert parse_source("C:/x.jsonl") == ("C:/x.jsonl", 1.0)
    with pytest.raises(UserError, match="weight must be a positive"):
        parse_source("a.jsonl:0")


def test_train_iterator_from_weighted_files(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"q{i}", f"beta {i}") for i in range(20)])
    it = make_train_iterator([f"{a}:2", b], tok, 32, 4, seed=0, cache_dir=str(tmp_path / "cache"))
    batch = next(it)
    assert batch["tokens"].shape == (4, 32) and batch["loss_mask"].sum() > 0
    assert "a.jsonl" in it.summary() and "weight 0.667" in it.summary()


def test_long_documents_are_split_not_dropped(tok, tmp_path):
    text = " ".join(f"w{i}" for i in range(500))
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "short"}])
    ids = tok.encode(text, bos=True, eos=True)
    assert len(ids) > 3 * 64
    batches = list(make_eval_batches(path, tok, 64, 2, cache_dir=str(tmp_path / "cache")))
    pairs = [(x, y) for x, y, _ in stream_pairs(batches)]
    short = tok.encode("short", bos=True, eos=True)
    assert pairs == list(zip(ids[:-1], ids[1:])) + list(zip(short[:-1], short[1:]))


def test_tokenized_files_are_cached(tok, tmp_path, monkeypatch):
    import nemo_jax.data as data

    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": "first version"}])
    cache = str(tmp_path / "cache")
    tokenize_file(str(path), tok, cache_dir=cache)

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "tokenize_records", boom)
    assert tokenize_file(str(path), tok, cache_dir=cache)["ids"][0] == tok.encode("first version", True, True)
    monkeypatch.undo()
    write_jsonl(path, [{"text": "second, longer version"}])  # new size and mtime: tokenized again
    assert tokenize_file(str(path), tok, cache_dir=cache)["ids"][0] == tok.encode("second, longer version", True, True)


def test_parallel_tokenization_matches(tok, tmp_path):
    records = [{"text": f"record {i} " * (i % 5)} if i % 3 else chat(f"q {i}", f"a {i}") for i in range(300)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    one = tokenize_file(path, tok, num_proc=1, cache_dir=str(tmp_path / "c1"))
    two = tokenize_file(path, tok, num_proc=2, cache_dir=str(tmp_path / "c2"))
    assert one["ids"] == two["ids"] and one["mask"] == two["mask"] and len(one) == 300


# ---- bad data ---------------------------------------------------------------------------------

BAD = [
    ('{"text": "ok"}\n{"text": "unterminated}\n', "bad.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n\n{"prompt": "x"}\n', r"bad.jsonl:3: a record with 'prompt' needs 'completion' too"),
    ('{"txt": "x"}\n', r"bad.jsonl:1: a record needs 'text' or 'messages' \(or .*found keys \['txt'\]"),
    ('{"text": 5}\n', "bad.jsonl:1: 'text' must be a string, got int"),
    ('[1, 2]\n', "bad.jsonl:1: a record must be a JSON object, got list"),
    ('{"text": "a", "messages": []}\n', "bad.jsonl:1: a record has either 'text' or 'messages'"),
    ('{"messages": "hi"}\n', "bad.jsonl:1: 'messages' must be a list"),
    ('{"messages": [{"role": "user", "content": "a"}], "tools": {}}\n', "bad.jsonl:1: 'tools' must be a list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x", "tool_call_id": "abc123XYZ"}, '
     '{"role": "assistant", "content": "b"}]}\n', r"bad.jsonl:1: messages\[1\]: role tool cannot follow user"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "1", "function": '
     '{"name": "f", "arguments": "{}"}}]}]}\n', "bad.jsonl:1: messages\\[1\\]: tool call id '1' must be 9 characters"),
    (b'{"text": "\xff"}\n', "bad.jsonl:1: not valid UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize("content,error", BAD, ids=range(len(BAD)))
def test_bad_records_name_file_line_and_reason(tok, tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=error):
        load_documents(str(path), tok, cache_dir=str(tmp_path / "cache"))


def test_skip_bad_records(tok, tmp_path, caplog):
    lines = ['{"text": "good one"}', "{oops", '{"text": 3}', '{"other": 1}', json.dumps(chat("a", "b"))]
    path = write_jsonl(tmp_path / "some_bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="nemo_jax.data"):
        docs = load_documents(path, tok, skip_bad_records=True, cache_dir=str(tmp_path / "cache"))
    assert len(docs) == 2 and docs.bad == 3
    assert [docs.get(i)[0].tolist() for i in range(2)] == [tok.encode("good one", True, True),
                                                            tok.encode_chat(chat("a", "b")["messages"])[0]]  # fmt: skip
    assert "skipped 3 bad records (first: " in docs.summary() and "some_bad.jsonl:2: malformed JSON" in caplog.text


def test_bad_sources(tok, tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl: no records"):
        load_documents(str(tmp_path / "empty.jsonl"), tok, cache_dir=cache)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="emptydir: no .jsonl/.json/.parquet files found"):
        load_documents(str(tmp_path / "emptydir"), tok, cache_dir=cache)
    with pytest.raises(UserError, match="nope.jsonl: no such data file"):
        load_documents(str(tmp_path / "nope.jsonl"), tok, cache_dir=cache)
    zero = write_jsonl(tmp_path / "zero.jsonl", [chat("a", "b", weight=0), chat("c", "d", weight=0)])
    with pytest.raises(UserError, match="zero.jsonl: no trained tokens"):
        load_documents(zero, tok, cache_dir=cache)
    (tmp_path / "arr.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(UserError, match="arr.json:2: malformed JSON"):
        load_documents(str(tmp_path / "arr.json"), tok, cache_dir=cache)
    (tmp_path / "arr2.json").write_text('[{"text": "a"}, {"txt": "b"}]')
    with pytest.raises(UserError, match="arr2.json: record 2: a record needs"):
        load_documents(str(tmp_path / "arr2.json"), tok, cache_dir=cache)
    pq.write_table(pa.table({"text": ["a", None], "other": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="p.parquet: row 2: a record needs"):
        load_documents(str(tmp_path / "p.parquet"), tok, cache_dir=cache)
