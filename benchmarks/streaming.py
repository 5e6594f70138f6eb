"""Streamed data (data.streaming) against the in-memory pipeline, same corpus, same run.

    python benchmarks/streaming.py [--mb 32] [--seq-len 4096] [--batch 8] [--batches 40] [--window 10000]

The corpus is a JSON-lines file of chat and text records built from files already on disk (the
benchmarks/tokenizer.py corpus), written once to --dir. Reported:
  - time to the first batch: in-memory (tokenize the whole file with datasets.map into a fresh cache,
    then pack) against streaming (read and tokenize the first window). This is what streaming is for:
    the in-memory time grows with the data, the streamed one with the window;
  - packed tokens/s while batches are drawn (after the first): the rate streaming's background tokenizer
    sustains, against the up-front datasets.map rate; training must draw fewer than that (train.py logs
    its tokens/s) for the data never to make a step wait;
  - the time to restore a streamed state mid-run (re-reading and re-tokenizing one window per source).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.tokenizer import build_corpus  # noqa: E402
from nemo_jax.data import make_train_iterator  # noqa: E402
from nemo_jax.streaming import make_stream_iterator  # noqa: E402
from nemo_jax.tokenizer import load_tokenizer  # noqa: E402


def write_corpus(path: str, megabytes: float) -> int:
    docs = build_corpus(megabytes)
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            if i % 2:
                half = len(d) // 3
                rec = {"messages": [{"role": "user", "content": d[:half]}, {"role": "assistant", "content": d[half:]}]}
            else:
                rec = {"text": d}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(docs)


def drain(it, n: int, seq_len: int) -> tuple[float, float]:
    """(seconds to the first batch, packed non-padding tokens/s over the next n)."""
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t1, tokens = time.perf_counter(), 0
    for _ in range(n):
        tokens += int((next(it)["segment_ids"] > 0).sum())
    return first, tokens / (time.perf_counter() - t1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="where the corpus and the in-memory cache go (default: a temp dir)")
    args = ap.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="nemo_jax_stream_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    n = write_corpus(corpus, args.mb)
    size = os.path.getsize(corpus) / 1e6
    tok = load_tokenizer()
    print(f"corpus: {n} records, {size:.1f} MB; seq_len {args.seq_len}, batch {args.batch}, window {args.window}")

    cache = os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    mem = make_train_iterator([corpus], tok, args.seq_len, args.batch, seed=0, cache_dir=cache)
    setup = time.perf_counter() - t0
    first_m, rate_m = drain(mem, args.batches, args.seq_len)

    t0 = time.perf_counter()
    stream = make_stream_iterator([corpus], tok, args.seq_len, args.batch, seed=0, shuffle_window=args.window)
    setup_s = time.perf_counter() - t0
    first_s, rate_s = drain(stream, args.batches, args.seq_len)
    state = stream.state()
    t0 = time.perf_counter()
    again = make_stream_iterator([corpus], tok, args.seq_len, args.batch, seed=0, shuffle_window=args.window)
    again.restore(state)
    next(again)
    restore_s = time.perf_counter() - t0

    print(f"time to first batch: in-memory {setup + first_m:.2f} s (tokenize whole file {setup:.2f} s) | "
          f"streaming {setup_s + first_s:.2f} s  -> {(setup + first_m) / (setup_s + first_s):.1f}x sooner")
    up_front = mem.sources[0].num_tokens / setup
    print(f"tokens/s: in-memory up-front tokenization {up_front:,.0f} (datasets.map) | streaming, packed batches "
          f"drawn after the first {rate_s:,.0f} ({rate_s / up_front:.2f}x) | in-memory packed batches {rate_m:,.0f}")
    print(f"streamed resume (new iterator + restore + one batch): {restore_s:.2f} s")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
