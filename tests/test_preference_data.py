"""Preference pairs from every source kind data.py reads, renamed fields, and weighted mixing with exact resume."""

import json
import re
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_jax import load_tokenizer
from nemo_jax import preference as PF
from nemo_jax.errors import UserError
from nemo_jax.records import DataSource


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def pair(i, tag):
    return {"prompt": f"{tag} question {i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}"}


def first_prompts(batch, tok):
    """The prompt text of each row's chosen side (segment 1)."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        ids = batch["tokens"][r][batch["segment_ids"][r] == 1].tolist()
        m = re.search(r"\w+ question \d+", tok.decode(ids))
        out.append(m.group(0) if m else None)
    return out


def test_saved_datasets_parquet_and_renamed_fields_read_as_jsonl(tmp_path, tok):
    """The same pairs as JSON lines, parquet (nested fields as JSON text), a saved dataset and a file whose fields
    are renamed with `columns` give the same tokens, named by row or line in errors."""
    recs = [pair(i, "x") for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pq.write_table(pa.Table.from_pylist([{**r, "chosen": json.dumps({"role": "assistant", "content": r["chosen"]})}
                                         for r in recs]), tmp_path / "p.parquet")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "renamed.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "accepted": r["chosen"],
                                                                "rejected": r["rejected"]}) + "\n" for r in recs))
    renamed = DataSource(str(tmp_path / "renamed.jsonl"), columns=(("prompt", "q"), ("chosen", "accepted")))
    want = PF.load_pairs(str(tmp_path / "p.jsonl"), tok, 128)
    for source in (str(tmp_path / "p.parquet"), str(tmp_path / "saved"), renamed):
        got = PF.load_pairs(source, tok, 128)
        assert len(got) == 5 and all(all(np.array_equal(a, b) for a, b in zip(g, w))
                                     for g, w in zip(got.sides, want.sides)), source
        assert PF.is_preference_source(source)
    assert PF.load_pairs(str(tmp_path / "saved"), tok, 128).where[2].endswith(": row 3")
    pq.write_table(pa.Table.from_pylist([pair(0, "y"), {"prompt": "p", "chosen": "c"}]), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: row 2: .*'chosen' and 'rejected'"):
        PF.load_pairs(str(tmp_path / "bad.parquet"), tok, 128)


def test_weighted_sources_mix_by_weight_and_resume_exactly(tmp_path, tok):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(pair(i, "aa")) + "\n" for i in range(7)))
    b.write_text("".join(json.dumps(pair(i, "bb")) + "\n" for i in range(3)))
    make = lambda: PF.make_pair_iterator([DataSource(str(a), 3.0), DataSource(str(b), 1.0)], tok, 64, 4, seed=5)  # noqa: E731
    it, batches, states = make(), [], []
    for _ in range(100):
        states.append(json.loads(json.dumps(it.state())))
        batches.append(next(it))
    counts = Counter(p.split()[0] for batch in batches for p in first_prompts(batch, tok))
    assert abs(counts["aa"] / 400 - 0.75) < 0.06, counts  # by weight, not by size (7 : 3)
    rows = [p for batch in batches for p in first_prompts(batch, tok)]
    bb = [p for p in rows if p.startswith("bb")]
    assert sorted(bb[:3]) == [f"bb question {i}" for i in range(3)]  # each source: a permutation per epoch
    for k in (1, 37, 99):
        again = make()
        again.restore(states[k])
        for j in range(k, 100):
            assert all(np.array_equal(next_b[x], batches[j][x]) for next_b in [next(again)] for x in next_b), (k, j)
    one = PF.make_pair_iterator([str(a)], tok, 64, 4, seed=5)
    assert set(one.state()) == {"seed", "epoch", "position", "num_pairs"}  # one source: the state as before
    with pytest.raises(UserError, match="preference pairs"):
        one.restore(states[3])
