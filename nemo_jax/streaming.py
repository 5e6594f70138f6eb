"""Streamed training data (`data.streaming: true`): sources read and tokenized while training runs.

For sources too large to tokenize up front (data.py tokenizes every file before step 0 and keeps
it on disk). Nothing is cached: records are read in file order, tokenized in a background thread a
few windows ahead of the packer, and packed into the same batches as data.py describes (same keys,
next-token shift, segments, row rules, multi-host layout).

Hub datasets
    An `hf:` source whose dataset card declares its files (`configs:`) is listed, not downloaded: each
    file is fetched when the reader reaches it, the next one downloading meanwhile. Otherwise the split
    is downloaded first, as for the in-memory pipeline.

Order
    A source's records are cut into windows of `shuffle_window` records in file order; each window
    is tokenized as one batch and its documents are shuffled with a permutation drawn from (seed,
    source, epoch, window). `shuffle_window: 1` keeps file order. A window never crosses the end of
    the source; after its last file the source starts its next epoch at the first record. Mixture
    draws between sources come from (seed, draw number), as in data.py.

Resumption
    `state()` is a small JSON dict: per source the epoch, the window's number and the file position
    of its first record, and how many of its documents were taken; the draw count; the piece of a
    document the last row could not take. `restore(state)` re-reads and re-tokenizes only the
    current window of each source, and continues with exactly the batches the uninterrupted run would
    have produced.

Multi-host
    Every process reads and tokenizes every source (the layout of the global batch depends on all
    document lengths) and materializes only its own rows, as data.py does.

Bad data
    A bad record is found when its window is tokenized, mid-run: `UserError("file:line: reason")`,
    or, with `skip_bad_records`, skipped and counted in `summary()`. A source whose whole epoch yields
    no trainable document is an error.
"""

import concurrent.futures
import logging
import os
import queue
import threading

import numpy as np

from nemo_jax.data import check_records, parse_source, record_where, records_from, tokenize_records
from nemo_jax.errors import UserError
from nemo_jax.packing import Mixture, check_shape, materialize, next_row
from nemo_jax.records import DataSource, RemoteFile, stream_files

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 10_000  # records: ~10-50 MB of text per window for chat data
_PREFETCH = 2  # windows tokenized ahead of the packer, per source


class _Window:
    """One window's documents: (ids int32, mask bool) pairs in their shuffled order."""

    def __init__(self, epoch, index, start, docs, end, bad, bad_example):
        self.epoch, self.index, self.start, self.end = epoch, index, start, end
        self.docs, self.bad, self.bad_example = docs, bad, bad_example


class StreamSource:
    """One source's files read in order as windows of records; see the module docstring."""

    def __init__(self, source: DataSource, tokenizer, window: int, seed: int, index: int, skip_bad_records: bool):
        self.source, self.tokenizer, self.window, self.seed, self.index = source, tokenizer, window, seed, index
        self.skip_bad_records = skip_bad_records
        self.files = stream_files(source)  # paths, or RemoteFiles of a Hub dataset fetched as they are reached
        self.names = [os.path.basename(f.name if isinstance(f, RemoteFile) else f) for f in self.files]
        for f in self.files:  # file-level problems (no records, a broken JSON array) before step 0
            if not isinstance(f, RemoteFile):
                check_records(f)
        self._fetches, self._pool = {}, concurrent.futures.ThreadPoolExecutor(1, f"fetch-{index}")
        self.bad, self.bad_example = 0, ""

    def _fetch(self, i: int) -> concurrent.futures.Future:
        if i not in self._fetches:
            f = self.files[i]
            if isinstance(f, RemoteFile):
                self._fetches[i] = self._pool.submit(_download_checked, f)
            else:
                self._fetches[i] = concurrent.futures.Future()
                self._fetches[i].set_result(f)
        return self._fetches[i]

    def path(self, i: int) -> str:
        """File i's local path; a Hub file is downloaded now, and the next one starts downloading."""
        if i + 1 < len(self.files):
            self._fetch(i + 1)  # its download overlaps this file's reading
        return self._fetch(i).result()

    def read(self, epoch: int, index: int, start, stop=None) -> _Window | None:
        """Window `index` of `epoch`, its first record at `start` = [file, offset, count]; None once `stop`
        (a threading.Event) is set."""
        f, offset, count = start
        batch, end = {"loc": [], "raw": [], "error": [], "file": []}, None
        while end is None and f < len(self.files):
            for rec, pos in records_from(self.path(f), (offset, count)):
                if stop is not None and stop.is_set():
                    return None
                for k in ("loc", "raw", "error"):
                    batch[k].append(rec[k])
                batch["file"].append(f)
                if len(batch["raw"]) == self.window:
                    end = [f, *pos]
                    break
            else:
                f, offset, count = f + 1, 0, 0  # this file is done
        end = end or [len(self.files), 0, 0]
        out = tokenize_records(batch, self.tokenizer, self.source.columns)
        docs, bad, bad_example = [], 0, ""
        for i, err in enumerate(out["error"]):
            if err:
                where = f"{record_where(self.path(batch['file'][i]), batch['loc'][i])}: {err}"
                if not self.skip_bad_records:
                    raise UserError(where)
                bad, bad_example = bad + 1, bad_example or where
            elif len(out["ids"][i]) >= 2:  # a 1-token document has no next-token pair
                docs.append((np.asarray(out["ids"][i], np.int32), np.asarray(out["mask"][i], bool)))
        perm = np.random.default_rng([self.seed, 3, self.index, epoch, index]).permutation(len(docs))
        return _Window(epoch, index, list(start), [docs[i] for i in perm], end, bad, bad_example)

    def after(self, w: _Window) -> tuple[int, int, list]:
        """(epoch, index, start) of the window after `w`."""
        if w.end[0] >= len(self.files):
            return w.epoch + 1, 0, [0, 0, 0]
        return w.epoch, w.index + 1, w.end


def _download_checked(f: RemoteFile) -> str:
    path = f.local()
    check_records(path)  # as a local file's are before step 0
    return path


class _Reader:
    """A background thread reading a source's windows from a position onwards, `_PREFETCH` ahead."""

    def __init__(self, source: StreamSource, epoch, index, start):
        self.source, self._queue, self._stop = source, queue.Queue(_PREFETCH), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(epoch, index, start), daemon=True,
                                        name=f"stream-{source.index}")  # fmt: skip
        self._thread.start()

    def _run(self, epoch, index, start):
        empty_epoch = index == 0  # a whole pass without one document would loop forever
        try:
            while not self._stop.is_set():
                w = self.source.read(epoch, index, start, self._stop)
                if w is None:
                    return
                empty_epoch = empty_epoch and not w.docs
                self._put(w)
                epoch2, index, start = self.source.after(w)
                if epoch2 != epoch:
                    if empty_epoch:
                        raise UserError(f"{self.source.source}: no documents with a next-token pair in a whole pass")
                    epoch, empty_epoch = epoch2, True
        except BaseException as e:  # handed to the consumer, raised at its next batch
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                return self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue

    def get(self) -> _Window:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()


class StreamingIterator:
    """Endless packed training batches from streamed, weighted sources; see the module docstring."""

    def __init__(self, sources: list[StreamSource], seq_len, batch_size, seed, *, weights=None, pad_id=0,
                 process_index=0, process_count=1):  # fmt: skip
        self.sources = list(sources)
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, int(seed), pad_id
        self._local = check_shape(seq_len, batch_size, process_index, process_count)
        self._first_row = process_index * self._local
        self._mix = Mixture(self.seed, weights, len(self.sources))
        self._readers, self._restored = [], None
        self.restore({"format": "stream", "seed": self.seed, "draws": 0, "pending": None,
                      "sources": [{"epoch": 0, "window": 0, "start": [0, 0, 0], "taken": 0} for _ in self.sources],
                      "files": [s.names for s in self.sources]})  # fmt: skip

    def state(self) -> dict:
        """Where the iterator is: restore it to continue with exactly the same batches."""
        if self._restored is not None:
            return dict(self._restored)
        return {
            "format": "stream",
            "seed": self.seed,
            "draws": self._draws,
            "sources": [{"epoch": w.epoch, "window": w.index, "start": list(map(int, w.start)), "taken": t}
                        for w, t in zip(self._windows, self._taken)],
            "pending": None if self._pending is None else [int(self._pending[0]), int(self._pending[2])],
            "files": [s.names for s in self.sources],
        }  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("format") != "stream":
            raise UserError("the data state was saved by an in-memory (data.streaming: false) run; "
                            "resume with the same data.streaming")  # fmt: skip
        files = [s.names for s in self.sources]
        if state["seed"] != self.seed or state["files"] != files:
            raise UserError(f"data state is for seed {state['seed']} and files {state['files']}, "
                            f"but this run has seed {self.seed} and {files}")  # fmt: skip
        self.close()
        self._restored = state  # the readers start at the first batch: a restore right after __init__ reads once

    def _open(self):
        state, self._restored = self._restored, None
        self._draws = int(state["draws"])
        self._readers = [_Reader(s, st["epoch"], st["window"], st["start"])
                         for s, st in zip(self.sources, state["sources"])]  # fmt: skip
        self._windows = [r.get() for r in self._readers]
        self._taken = [int(st["taken"]) for st in state["sources"]]
        self._pending = None
        if state["pending"] is not None:  # the last document taken: its source's window holds it
            src, off = state["pending"]
            self._pending = (src, self._windows[src].docs[self._taken[src] - 1], off)
        for s, w in zip(self.sources, self._windows):  # counted from here (the first pass only)
            s.bad, s.bad_example = (w.bad, w.bad_example) if w.epoch == 0 else (0, "")

    def close(self):
        for r in self._readers:
            r.close()
        self._readers = []

    @property
    def epoch(self) -> int:
        """Completed passes over the first source."""
        return self._restored["sources"][0]["epoch"] if self._restored is not None else self._windows[0].epoch

    def summary(self) -> str:
        lines = []
        for s, p in zip(self.sources, self._mix.p):
            line = f"{s.source}: streamed, {len(s.files)} files, windows of {s.window} records (weight {p:.3f})"
            if s.bad:
                line += f"; skipped {s.bad} bad records in its first pass so far (first: {s.bad_example})"
            lines.append(line)
        return "\n".join(lines)

    def _next_doc(self):
        src = self._mix.source(self._draws)
        self._draws += 1
        while self._taken[src] == len(self._windows[src].docs):  # lazily: the window holds the last doc taken
            w = self._readers[src].get()
            s = self.sources[src]
            if w.epoch == 0:  # later passes meet the same records again
                s.bad, s.bad_example = s.bad + w.bad, s.bad_example or w.bad_example
            self._windows[src], self._taken[src] = w, 0
        doc = self._windows[src].docs[self._taken[src]]
        self._taken[src] += 1
        return src, doc, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._restored is not None:
            self._open()
        rows = []
        for _ in range(self.batch_size):
            segments, self._pending = next_row(self._next_doc, self._pending, lambda s, d: len(d[0]), self.seq_len)
            rows.append(segments)
        mine = rows[self._first_row : self._first_row + self._local]
        return materialize(mine, self.seq_len, self.pad_id, lambda s, d, a, b: (d[0][a:b], d[1][a:b]))


def make_stream_iterator(
    sources: list[str | DataSource] | str, tokenizer, seq_len: int, batch_size: int, seed: int,
    skip_bad_records: bool = False, process_index: int = 0, process_count: int = 1, *,
    shuffle_window: int | None = None,
) -> StreamingIterator:  # fmt: skip
    """Streamed, packed, mixed training batches from `path[:weight]` sources (or DataSources)."""
    specs = [sources] if isinstance(sources, (str, DataSource)) else list(sources)
    if not specs:
        raise UserError("no training data sources given")
    window = DEFAULT_WINDOW if shuffle_window is None else int(shuffle_window)
    if window < 1:
        raise UserError(f"data.shuffle_window must be >= 1 records, got {shuffle_window}")
    parsed = [s if isinstance(s, DataSource) else DataSource(*parse_source(s)) for s in specs]
    streams = [StreamSource(s, tokenizer, window, seed, i, skip_bad_records) for i, s in enumerate(parsed)]
    it = StreamingIterator(streams, seq_len, batch_size, seed, weights=[s.weight for s in parsed],
                           pad_id=tokenizer.pad_id, process_index=process_index, process_count=process_count)  # fmt: skip
    log.info("training data:\n%s", it.summary())
    return it

