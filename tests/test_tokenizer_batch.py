"""Tokenizer.encode_batch: the same ids as encode one by one, in order, on any number of threads; threads
only when the batch is large enough and the machine has idle CPUs (nemo_jax/tokenizer.py)."""

import json
from pathlib import Path

import pytest

from nemo_jax import load_tokenizer
from nemo_jax import tokenizer as T

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_batch_equals_the_loop_on_any_threads(tok):
    texts = [json.loads(line)["text"] for line in (ROOT / "data/demo/pretrain_eval.jsonl").open()]
    texts = [texts[0] * 400] + texts + ["", "x"]  # shares of unequal counts: one long text, then short ones
    want = [tok.encode(t, bos=True, eos=True) for t in texts]
    for n in (None, 1, 2, 3, 7):
        assert tok.encode_batch(texts, bos=True, eos=True, num_threads=n) == want, n
    assert len(T._shares(texts, 3)[0]) == 1  # cut by length, not by count
    assert sum(T._shares(texts, 3), []) == texts


def test_threads_follow_the_workload(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(T.os, "getloadavg", lambda: (0.5, 0.5, 0.5), raising=False)
    assert T.batch_threads(1004 * 200) == 1  # short texts: the loop (threads cost more than they save)
    assert T.batch_threads(3 * T.CHARS_PER_THREAD) == 3
    assert T.batch_threads(100 * T.CHARS_PER_THREAD) == 4  # one per CPU
    monkeypatch.setattr(T.os, "getloadavg", lambda: (6.0, 6.0, 6.0), raising=False)
    assert T.batch_threads(100 * T.CHARS_PER_THREAD) == 1  # no idle CPU: a thread would only wait
