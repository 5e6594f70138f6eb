"""Streamed training data (data.streaming): the same batches as the in-memory pipeline where the order is
the same, exact resume from any state, shuffling windows, multi-process rows, bad data, train.py."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_jax import load_tokenizer
from nemo_jax.data import load_documents, make_eval_batches, read_records, records_from
from nemo_jax.errors import UserError
from nemo_jax.streaming import make_stream_iterator

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def records(n, seed, long_every=5):
    """Chat and text records of varied length; every `long_every`-th one is longer than a row."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(f"w{seed}x{int(w)}" for w in rng.integers(0, 500, 30 if i % long_every == 0 else rng.integers(1, 8)))
        words = f"r{seed}n{i} {words}"  # every document differs
        if i % 2:
            out.append({"messages": [{"role": "user", "content": f"q{i} {words[:20]}"},
                                     {"role": "assistant", "content": words}]})
        else:
            out.append({"text": words})
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory source of three file kinds (JSON lines with blank lines, parquet of several row groups,
    a JSON array) and a second, saved-dataset source."""
    d = tmp_path_factory.mktemp("stream")
    src = d / "mixed"
    src.mkdir()
    recs = records(23, 0)
    (src / "a.jsonl").write_text("".join(json.dumps(r) + ("\n\n" if i % 4 == 0 else "\n") for i, r in enumerate(recs)))
    pq.write_table(pa.Table.from_pylist([{"text": r.get("text") or r["messages"][1]["content"]} for r in records(17, 1)]),
                   src / "b.parquet", row_group_size=5)
    (src / "c.json").write_text(json.dumps(records(9, 2)))
    datasets.Dataset.from_list([{"text": r.get("text", "x y z")} for r in records(31, 3)]).save_to_disk(str(d / "saved"))
    return str(src), str(d / "saved")


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


def test_positions_resume_every_file_kind(corpus):
    """records_from(path, the position after record i) gives exactly the records after i."""
    for f in sorted(Path(corpus[0]).iterdir()):
        whole = list(records_from(str(f)))
        assert [r for r, _ in whole] == list(read_records(str(f)))
        for i in (0, 3, 6, len(whole) - 1):
            assert [r for r, _ in records_from(str(f), whole[i][1])] == [r for r, _ in whole[i + 1:]], (f, i)
    arrow = next(Path(corpus[1]).glob("*.arrow"))
    whole = list(records_from(str(arrow)))
    assert len(whole) == 31 and [r for r, _ in records_from(str(arrow), whole[9][1])] == [r for r, _ in whole[10:]]


def test_file_order_is_the_in_memory_eval_packing(corpus, tok):
    """With shuffle_window 1 a streamed source yields, batch for batch, what data.py's file-order packing
    (make_eval_batches) yields from the same files, up to the batch where the second pass begins."""
    evals = list(make_eval_batches(corpus[0], tok, 32, 3, cache_dir=None))
    it = make_stream_iterator([corpus[0]], tok, 32, 3, seed=0, shuffle_window=1)
    assert len(evals) > 10
    for i, want in enumerate(evals[:-1]):
        assert same(next(it), want), i


def test_windows_shuffle_each_pass(corpus, tok):
    """A pass yields every document once; each window of records is shuffled within itself, by seed,
    differently each epoch."""
    n = len(load_documents(corpus[0], tok))

    def docs(seed, passes, window):
        it = make_stream_iterator([corpus[0]], tok, 4096, 1, seed=seed, shuffle_window=window)
        out = []
        while len(out) < passes * n:
            b = next(it)
            out += [tuple(b["tokens"][0][b["segment_ids"][0] == s]) for s in range(1, b["segment_ids"].max() + 1)]
        return out[: passes * n]

    in_order, a, b = docs(0, 1, 1), docs(0, 2, 8), docs(1, 1, 8)
    assert len(set(in_order)) == n  # every record here is a document: windows of documents = of records
    assert sorted(a[:n]) == sorted(a[n:]) == sorted(b) == sorted(in_order)
    assert a[:n] != in_order and a[:n] != a[n:] and a[:n] != b
    for w in range(0, n, 8):
        assert sorted(a[:n][w : w + 8]) == sorted(in_order[w : w + 8])  # shuffled within its window only
    assert docs(0, 1, 8) == a[:n]


def test_resume_from_any_state_is_exact(corpus, tok):
    """Two weighted sources, windows of 5 records, documents cut across rows, several epochs: restoring a
    JSON round-tripped state continues with exactly the batches of the uninterrupted run, and each of two
    processes gets its half of every global batch."""
    sources = [corpus[0], f"{corpus[1]}:2"]
    make = lambda **kw: make_stream_iterator(sources, tok, 24, 4, seed=7, shuffle_window=5, **kw)  # noqa: E731
    it, batches, states = make(), [], []
    for _ in range(90):
        states.append(json.loads(json.dumps(it.state())))
        batches.append(next(it))
    assert it.epoch >= 1 and states[-1]["sources"][1]["epoch"] >= 2  # the run wrapped both sources
    assert any(s["pending"] for s in states) and len({s["sources"][0]["window"] for s in states}) > 3
    for k in (1, 17, 40, 89):
        again = make()
        again.restore(states[k])
        for j in range(k, 90):
            assert same(next(again), batches[j]), (k, j)
    halves = [make(process_index=p, process_count=2) for p in (0, 1)]
    halves[1].restore(states[33])
    [next(halves[0]) for _ in range(33)]
    for j in range(33, 45):
        top, bottom = next(halves[0]), next(halves[1])
        assert all(np.array_equal(np.concatenate([top[k], bottom[k]]), batches[j][k]) for k in KEYS)


def test_bad_records_and_wrong_states(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i} " * 5}) for i in range(12)]
    lines[8] = '{"text": "broken'
    path.write_text("\n".join(lines) + "\n")
    it = make_stream_iterator([str(path)], tok, 16, 2, seed=0, shuffle_window=4)
    with pytest.raises(UserError, match=rf"{path}:9: malformed JSON"):
        for _ in range(20):
            next(it)
    it = make_stream_iterator([str(path)], tok, 16, 2, seed=0, shuffle_window=4, skip_bad_records=True)
    for _ in range(20):
        next(it)
    assert "skipped 1 bad records in its first pass" in it.summary() and f"{path}:9" in it.summary()
    other = make_stream_iterator([str(path)], tok, 16, 2, seed=1, shuffle_window=4, skip_bad_records=True)
    with pytest.raises(UserError, match="seed 0"):
        other.restore(it.state())
    with pytest.raises(UserError, match="data.streaming"):
        other.restore({"seed": 1, "draws": 0})
    empty = tmp_path / "short.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="no documents"):
        next(make_stream_iterator([str(empty)], tok, 16, 1, seed=0, skip_bad_records=True))


def test_train_streaming_resumes_exactly(tmp_path):
    """train.py with data.streaming: an interrupted run resumes with the uninterrupted run's losses, and a
    resume that would switch the pipeline stops with one line."""
    from nemo_jax.run_config import load_config
    from nemo_jax.trainer import train

    data = ROOT / "tests/fixtures/data/tiny_train.jsonl"

    def cfg(out, steps, *extra):
        return load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", f"data.train=[{data}]", "data.streaming=true",
                                                        "data.shuffle_window=6", "checkpoint.async_save=false",
                                                        "train.schedule=constant", f"train.steps={steps}", *extra])

    def losses(run):
        recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r and "split" not in r]

    full = losses(train(cfg(tmp_path / "full", 4)))
    train(cfg(tmp_path / "part", 2, "checkpoint.every=2"))
    shutil.copytree(tmp_path / "part", tmp_path / "switch")
    assert losses(train(cfg(tmp_path / "part", 4))) == full
    with pytest.raises(UserError, match=r"data.streaming true -> false"):
        train(load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path / 'switch'}", f"data.train=[{data}]",
                                                       "train.schedule=constant", "train.steps=4"]))


def test_streams_a_hub_dataset_from_the_cache(tmp_path, monkeypatch, tok):
    """An hf: source streams from the hub cache (offline), split and column mapping applied, in the
    order the in-memory pipeline reads it."""
    import io

    from hubcache import add_repo, offline_hub

    from nemo_jax.records import DataSource

    def parquet(rows):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=2)
        return buf.getvalue()

    rows = {s: [{"body": f"{s} document {i} " + "word " * (3 + i)} for i in range(7)] for s in ("train", "test")}
    add_repo(tmp_path, "org/stream", {f"{s}.parquet": parquet(r) for s, r in rows.items()}, repo_type="dataset")
    offline_hub(monkeypatch, tmp_path)
    source = DataSource("hf:org/stream", split="test", columns=(("text", "body"),))
    it = make_stream_iterator([source], tok, 4096, 1, seed=0, shuffle_window=1)
    batch = next(it)
    docs = load_documents(source, tok, cache_dir=str(tmp_path / "cache"))
    want = np.concatenate([docs.get(i)[0][:-1] for i in range(len(docs))])
    assert len(docs) == 7 and np.array_equal(batch["tokens"][0][: len(want)], want)
    assert tok.decode(batch["tokens"][0][1:6].tolist()).startswith("test document 0")


def test_hub_files_are_fetched_as_the_stream_reaches_them(tmp_path, monkeypatch, tok):
    """A streamed hf: source whose card declares its files is listed, not downloaded: each file is fetched
    when the reader reaches it (the next one alongside), and the stream is the in-memory order."""
    import io

    from hubcache import add_repo, offline_hub

    from nemo_jax import hub

    def parquet(rows):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        return buf.getvalue()

    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"
    files = {f"data/train-{i:04d}.parquet": parquet([{"text": f"part {i} doc {j} " + "w " * 30} for j in range(6)])
             for i in range(4)}
    add_repo(tmp_path, "org/big", {"README.md": card, **files, "data/test-0000.parquet": parquet([{"text": "t"}])},
             repo_type="dataset")
    offline_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(hub, "repo_files", lambda repo, revision, repo_type=None: ["README.md", *files,
                                                                                  "data/test-0000.parquet"])
    fetched, real = [], hub.dataset_file
    monkeypatch.setattr(hub, "dataset_file", lambda *a: (fetched.append(a[3]), real(*a))[1])
    it = make_stream_iterator(["hf:org/big"], tok, 128, 1, seed=0, shuffle_window=1)
    assert fetched == ["README.md"]  # listed only
    first = next(it)
    assert set(fetched) - {"README.md"} <= {"data/train-0000.parquet", "data/train-0001.parquet"}
    rest = [next(it) for _ in range(30)]
    assert sorted(set(fetched) - {"README.md"}) == sorted(files)  # never the test split
    docs = load_documents("hf:org/big", tok, cache_dir=str(tmp_path / "cache"))
    want = np.concatenate([docs.get(i)[0][:-1] for i in range(len(docs))])
    got = np.concatenate([b["tokens"][0][b["segment_ids"][0] > 0] for b in [first, *rest]])
    assert len(docs) == 24 and np.array_equal(got[: len(want)], want)
