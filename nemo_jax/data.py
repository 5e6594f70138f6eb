"""Training and eval data: files -> tokenized documents (HF datasets, cached) -> packed batches.

API
    make_train_iterator(sources, tokenizer, seq_len, batch_size, seed, skip_bad_records=False,
                        process_index=0, process_count=1, *, num_proc=None, cache_dir=None) -> PackedIterator
        next(it) -> batch;  it.state() -> dict;  it.restore(state);  it.summary() -> str
    make_eval_batches(path, tokenizer, seq_len, batch_size, *, process_index=0, process_count=1,
                      skip_bad_records=False, num_proc=None, cache_dir=None) -> EvalBatches
        iterable (as often as needed) of batches; len() = number of batches
    Lower level: load_documents(path, tokenizer, ...) -> Documents; PackedIterator(list of Documents,
    seq_len, batch_size, seed, weights=...); EvalBatches(Documents, seq_len, batch_size);
    Documents.from_lists(token lists, masks) for data already tokenized.

Sources
    A source is a `.jsonl`, `.json` (a JSON array, or JSON lines) or `.parquet` file, a directory
    (searched recursively for those), a glob, a `datasets` save_to_disk directory or an `hf:` Hub
    dataset, as a path or a `records.DataSource` (records.py). `path:weight` mixes sources by weight,
    as in mistral-finetune: each document is drawn from source i with probability w_i / sum(w).
    Every record is normalised by `records.normalize` (text, messages + tools, prompt/completion,
    ShareGPT, Alpaca, renamed by the source's `columns`) to `{"text": str}` (pretraining:
    `<s> text </s>`, every token trained) or `{"messages": [...], "tools": [...]}` (instruct,
    `Tokenizer.encode_chat`: only assistant turns are trained). Other keys are ignored.

Tokenisation
    Each file is tokenized once with `datasets.map` (in parallel for large files) and saved under
    `cache_dir`, keyed by the file's path, size and mtime, the tokenizer file and this code; later
    runs memory-map the saved Arrow files and start at once.

Batches: a dict of numpy arrays, each [B, T] (B = this process's rows, T = seq_len)
    tokens       int32    input ids
    targets      int32    the next token of the same document: what position t must predict
    loss_mask    float32  1.0 where targets[b, t] is trained, 0.0 elsewhere (padding, prompts, weight 0)
    segment_ids  int32    1, 2, 3, ... for the document pieces of a row; 0 for padding
    positions    int32    position within the document piece, from 0

    The next-token shift is done here, per document: a document of n tokens gives the n - 1 pairs
    (ids[:-1] -> ids[1:]), `loss_mask` is the document's mask shifted the same way, and no position
    ever has another document's token as its target. Attention must stay within a segment.

Packing
    Rows are filled in order with whole documents; a document that does not fit the rest of a row
    starts the next row (the rest is padding), and so does the document after the 63rd of a row
    (config.MAX_DOCUMENTS_PER_ROW: the GPU attention kernel's fixed table of documents). A
    document with more than T pairs is cut into pieces: its head fills the current row and the
    rest continues in the next rows, every piece a new segment starting at position 0. No token
    is dropped or repeated.

Order and resumption
    Each source is shuffled with a permutation drawn from (seed, source, epoch), and cycles through
    its epochs independently; mixture draws come from (seed, draw number). The whole iterator
    position is `PackedIterator.state()`, a small JSON-serialisable dict; `restore(state)` continues
    with exactly the batches the uninterrupted run would have produced.

Eval
    `make_eval_batches` packs documents in file order, each exactly once, with segment ids (no
    attention across documents); long documents are split as above (a later piece does not see the
    earlier one). The last batch is completed with empty rows (all-zero loss_mask).

Multi-host
    `batch_size` is the global batch. Every process lays out the same global batch from document
    lengths alone and reads the tokens of its own rows, `process_index`'s contiguous block of
    batch_size / process_count rows.

Bad data
    A malformed JSON line, a record of neither kind or with fields of the wrong type raises
    `UserError("file:line: reason")`; with `skip_bad_records=True` such records are skipped, counted
    and reported in `summary()` and the log. A source with no documents or no trained tokens is an error.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nemo_jax.errors import UserError
from nemo_jax.packing import Mixture, check_shape, materialize, next_row
from nemo_jax.records import SAVED_EXTENSION, DataSource, as_source, normalize, resolve, source_files  # noqa: F401

log = logging.getLogger(__name__)

_RAW = datasets.Features(
    {"loc": datasets.Value("int64"), "raw": datasets.Value("string"), "error": datasets.Value("string")}
)
_TOKENIZED = datasets.Features({
    "loc": datasets.Value("int64"),
    "error": datasets.Value("string"),
    "ids": datasets.List(datasets.Value("int32")),
    "mask": datasets.List(datasets.Value("bool")),
    "trained": datasets.Value("int64"),
})  # fmt: skip


def _code_version() -> str:
    """Hash of the code that produces tokenized files, so a change invalidates their caches."""
    h = hashlib.sha256()
    for mod in ("tokenizer.py", "data.py", "records.py"):
        with open(os.path.join(os.path.dirname(__file__), mod), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def default_cache_dir() -> str:
    return os.environ.get("NEMO_JAX_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nemo_jax", "data")


# ---- sources ----------------------------------------------------------------------------------


def parse_source(spec: str) -> tuple[str, float]:
    """'path' or 'path:weight' -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        w = float(weight)
    except ValueError:
        return spec, 1.0  # a colon inside the path
    if not (math.isfinite(w) and w > 0):
        raise UserError(f"data source {spec!r}: weight must be a positive number")
    return path, w


# ---- reading and tokenizing one file ----------------------------------------------------------


def record_where(path: str, loc: int) -> str:
    """How an error names a record: file:line for JSON lines, else the record/row number."""
    if path.endswith(".jsonl") or path.endswith(".json") and not _is_json_array(path):
        return f"{path}:{loc}"
    return f"{path}: {'row' if path.endswith(('.parquet', SAVED_EXTENSION)) else 'record'} {loc}"


def _is_json_array(path: str) -> bool:
    """Does a .json file hold one JSON array (rather than JSON lines)?"""
    with open(path, "rb") as f:
        while chunk := f.read(65536):
            if chunk := chunk.lstrip(b" \t\r\n"):
                return chunk.startswith(b"[")
    return False


def read_records(path: str):
    """Yield {"loc", "raw" (one record as JSON text), "error"}; never raises on bad records."""
    for rec, _ in records_from(path):
        yield rec


def records_from(path: str, start: tuple[int, int] = (0, 0)):
    """Yield (record as read_records gives it, the position after it), from position `start`.

    A position is (offset, records or lines before it): a byte offset into JSON lines, a row or
    array index otherwise. It is what a streamed source saves to continue where it stopped."""
    offset, count = start
    if path.endswith((".parquet", SAVED_EXTENSION)):
        row = offset
        for batch in _row_batches(path, offset):
            for rec in batch.to_pylist():
                row += 1
                try:
                    for key in ("messages", "tools"):
                        if isinstance(rec.get(key), str):
                            rec[key] = json.loads(rec[key])
                    yield {"loc": row, "raw": json.dumps(rec, ensure_ascii=False, default=str), "error": ""}, (row, row)
                except (ValueError, TypeError) as e:
                    yield {"loc": row, "raw": "", "error": f"cannot read row: {e}"}, (row, row)
    elif path.endswith(".json") and _is_json_array(path):
        with open(path, encoding="utf-8") as f:
            records = json.load(f)  # checked by check_records before we get here
        for i in range(offset, len(records)):
            yield {"loc": i + 1, "raw": json.dumps(records[i], ensure_ascii=False), "error": ""}, (i + 1, i + 1)
    else:
        with open(path, "rb") as f:
            f.seek(offset)
            line_no = count
            for line in f:
                line_no, offset = line_no + 1, offset + len(line)
                if not line.strip():
                    continue  # blank lines hold no record
                try:
                    yield {"loc": line_no, "raw": line.decode("utf-8"), "error": ""}, (offset, line_no)
                except UnicodeDecodeError as e:
                    yield {"loc": line_no, "raw": "", "error": f"not valid UTF-8 at byte {e.start}"}, (offset, line_no)


def _row_batches(path: str, start: int = 0):
    """Record batches of a parquet file or of a saved dataset's Arrow (IPC stream) file, from row `start`."""
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        first, g = 0, 0
        while g < pf.metadata.num_row_groups and first + pf.metadata.row_group(g).num_rows <= start:
            first, g = first + pf.metadata.row_group(g).num_rows, g + 1  # whole groups before start: not read
        if g < pf.metadata.num_row_groups:
            yield from _skip_rows(pf.iter_batches(batch_size=1024, row_groups=range(g, pf.metadata.num_row_groups)),
                                  start - first)
    else:
        with pa.memory_map(path) as source:  # zero-copy: skipped batches cost nothing
            yield from _skip_rows(pa.ipc.open_stream(source), start)


def _skip_rows(batches, skip: int):
    for batch in batches:
        if skip < len(batch):
            yield batch.slice(skip)
            skip = 0
        else:
            skip -= len(batch)


def check_records(path: str) -> None:
    """File-level problems: a .json array that does not parse, a file with no records at all."""
    if path.endswith(".parquet"):
        empty = pq.ParquetFile(path).metadata.num_rows == 0
    elif path.endswith(SAVED_EXTENSION):
        empty = not any(len(b) for b in _row_batches(path))
    elif path.endswith(".json") and _is_json_array(path):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid UTF-8 at byte {e.start}") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: a .json data file must hold a list of records or JSON lines")
        empty = not records
    else:
        with open(path, "rb") as f:
            empty = not any(line.strip() for line in f)  # stops at the first record
    if empty:
        raise UserError(f"{path}: no records")


def tokenize_records(batch: dict, tokenizer, columns=(), threads: int | None = None) -> dict:
    n = len(batch["raw"])
    ids, mask, errors = [[] for _ in range(n)], [[] for _ in range(n)], list(batch["error"])
    texts = {}
    for i in range(n):
        if errors[i]:
            continue
        try:
            rec = normalize(json.loads(batch["raw"][i]), columns)  # every format -> text or messages
            if "text" in rec:
                texts[i] = rec["text"]
            else:
                ids[i], mask[i] = tokenizer.encode_chat(rec["messages"], rec.get("tools"))
        except json.JSONDecodeError as e:
            errors[i] = f"malformed JSON: {e.msg} (column {e.colno})"
        except UserError as e:  # the record's own problem; the file and line are added later
            errors[i] = str(e)
    for i, doc in zip(texts, tokenizer.encode_batch(list(texts.values()), bos=True, eos=True, num_threads=threads)):
        ids[i], mask[i] = doc, [True] * len(doc)
    trained = [sum(m[1:]) for m in mask]
    return {"loc": batch["loc"], "error": errors, "ids": ids, "mask": mask, "trained": trained}


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenize_file(path: str, tokenizer, *, columns=(), num_proc: int | None = None, cache_dir: str | None = None):
    """One data file -> a datasets.Dataset (loc, error, ids, mask, trained), cached on disk.

    `columns`: the source's field mapping ((canonical, field) pairs, records.normalize)."""
    cache_dir = cache_dir or default_cache_dir()
    st = os.stat(path)
    columns = [list(c) for c in columns]
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, tokenizer.fingerprint, _code_version()]
                     + ([columns] if columns else []))
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    out = os.path.join(cache_dir, f"{os.path.basename(path)}-{key}")
    if os.path.exists(os.path.join(out, "dataset_info.json")):
        return datasets.load_from_disk(out)
    check_records(path)
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
    try:
        raw = datasets.Dataset.from_generator(
            read_records, features=_RAW, gen_kwargs={"path": path}, cache_dir=work, fingerprint=f"{key}-raw"
        )
        if num_proc is None:  # worker start-up (~1 s) only pays off on large files
            num_proc = max(1, min(_usable_cpus(), len(raw) // 20_000))
        tokenized = raw.map(
            tokenize_records,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["raw"],
            features=_TOKENIZED,
            # One process per core already: a worker's own encode threads would only contend for them.
            fn_kwargs={"tokenizer": tokenizer, "columns": columns, "threads": 1 if num_proc > 1 else None},
            new_fingerprint=key,
            desc=f"tokenizing {os.path.basename(path)}",
        )
        tokenized.save_to_disk(os.path.join(work, "out"))
        try:
            os.rename(os.path.join(work, "out"), out)
        except OSError:  # another process saved it first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return datasets.load_from_disk(out)


# ---- documents --------------------------------------------------------------------------------


class Documents:
    """The tokenized documents of one source, memory-mapped; document i -> (ids, mask)."""

    def __init__(self, tables, name: str, bad: int = 0, bad_example: str = ""):
        self.name, self.bad, self.bad_example = name, bad, bad_example
        self._chunks, starts, lengths, valid = [], [0], [], []
        for table in tables:
            for batch in table.select(["ids", "mask", "error"]).to_batches():
                ids, mask, err = batch.columns
                offsets = ids.offsets.to_numpy()
                self._chunks.append((offsets, ids.values.to_numpy(), mask.offsets.to_numpy(), mask.values))
                starts.append(starts[-1] + len(ids))
                lengths.append(np.diff(offsets))
                valid.append(pc.equal(err, "").to_numpy(zero_copy_only=False))
        self._starts = np.array(starts, np.int64)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        valid = (np.concatenate(valid) if valid else np.zeros(0, bool)) & (lengths >= 2)
        self._rows = np.flatnonzero(valid)  # documents -> rows; bad records and 1-token docs have no pairs
        self.lengths = lengths[self._rows]
        self.num_tokens = int(self.lengths.sum())
        self.num_trained = sum(int(pc.sum(t.column("trained")).as_py() or 0) for t in tables)

    @classmethod
    def from_lists(cls, ids: list, masks: list | None = None, name: str = "memory") -> "Documents":
        """Documents from in-memory token lists (masks default to all trained)."""
        masks = masks if masks is not None else [[True] * len(d) for d in ids]
        table = pa.Table.from_pydict(
            {"loc": list(range(1, len(ids) + 1)), "error": [""] * len(ids), "ids": [list(map(int, d)) for d in ids],
             "mask": [list(map(bool, m)) for m in masks], "trained": [int(sum(m[1:])) for m in masks]},
            schema=_TOKENIZED.arrow_schema,
        )  # fmt: skip
        return cls([table], name)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, i: int, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of document i, and their mask."""
        row = self._rows[i]
        c = int(np.searchsorted(self._starts, row, side="right")) - 1
        offsets, values, mask_offsets, mask_values = self._chunks[c]
        j = row - self._starts[c]
        n = offsets[j + 1] - offsets[j]
        stop = n if stop is None else min(stop, n)
        ids = values[offsets[j] + start : offsets[j] + stop]
        mask = mask_values.slice(mask_offsets[j] + start, stop - start).to_numpy(zero_copy_only=False)
        return ids, mask

    def summary(self) -> str:
        s = f"{self.name}: {len(self)} documents, {self.num_tokens} tokens, {self.num_trained} trained"
        if self.bad:
            s += f"; skipped {self.bad} bad records (first: {self.bad_example})"
        return s


def load_documents(path, tokenizer, *, skip_bad_records=False, num_proc=None, cache_dir=None) -> Documents:
    """Tokenize (or load from cache) every file of a source: a path/dir/glob/hf: spec or a DataSource."""
    source = as_source(path)
    path = str(source)
    tables, bad, bad_example = [], 0, ""
    for f in resolve(source):
        table = tokenize_file(f, tokenizer, columns=source.columns, num_proc=num_proc, cache_dir=cache_dir).data.table
        errors = table.column("error")
        bad_rows = pc.indices_nonzero(pc.not_equal(errors, "")).to_numpy()
        if len(bad_rows):
            first = int(bad_rows[0])
            where = f"{record_where(f, table.column('loc')[first].as_py())}: {errors[first].as_py()}"
            if not skip_bad_records:
                raise UserError(where)
            bad, bad_example = bad + len(bad_rows), bad_example or where
        tables.append(table)
    docs = Documents(tables, path, bad, bad_example)
    if bad:
        log.warning("%s", docs.summary())
    if len(docs) == 0 or docs.num_trained == 0:
        raise UserError(f"{path}: no {'documents' if len(docs) == 0 else 'trained tokens (every turn has weight 0)'}")
    return docs


# ---- packing ----------------------------------------------------------------------------------


class PackedIterator:
    """Endless packed training batches from weighted sources; see the module docstring."""

    def __init__(self, sources, seq_len, batch_size, seed, *, weights=None, pad_id=0, process_index=0, process_count=1):
        self.sources = list(sources)
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, int(seed), pad_id
        self._local = check_shape(seq_len, batch_size, process_index, process_count)
        self._first_row = process_index * self._local
        self._mix = Mixture(self.seed, weights, len(self.sources))
        self._perm_cache = {}
        self.restore({"seed": self.seed, "draws": 0, "epochs": [0] * len(self.sources),
                      "positions": [0] * len(self.sources), "pending": None})  # fmt: skip

    def state(self) -> dict:
        """Where the iterator is: restore it to continue with exactly the same batches."""
        return {
            "seed": self.seed,
            "draws": self._draws,
            "epochs": list(self._epochs),
            "positions": list(self._positions),
            "pending": None if self._pending is None else [int(x) for x in self._pending],
            "num_docs": [len(s) for s in self.sources],
        }

    def restore(self, state: dict) -> None:
        num_docs = state.get("num_docs", [len(s) for s in self.sources])
        if state["seed"] != self.seed or num_docs != [len(s) for s in self.sources]:
            raise UserError(
                f"data state is for seed {state['seed']} and sources of {num_docs} documents, "
                f"but this run has seed {self.seed} and {[len(s) for s in self.sources]}"
            )
        self._draws = int(state["draws"])
        self._epochs, self._positions = list(state["epochs"]), list(state["positions"])
        self._pending = tuple(state["pending"]) if state["pending"] is not None else None

    @property
    def epoch(self) -> int:
        """Completed passes over the first source."""
        return self._epochs[0]

    def summary(self) -> str:
        return "\n".join(f"{s.summary()} (weight {p:.3f})" for s, p in zip(self.sources, self._mix.p))

    def _permutation(self, src: int, epoch: int) -> np.ndarray:
        if self._perm_cache.get(src, (None,))[0] != epoch:
            perm = np.random.default_rng([self.seed, 2, src, epoch]).permutation(len(self.sources[src]))
            self._perm_cache[src] = (epoch, perm)
        return self._perm_cache[src][1]

    def _next_doc(self):
        src = self._mix.source(self._draws)
        self._draws += 1
        doc = int(self._permutation(src, self._epochs[src])[self._positions[src]])
        self._positions[src] += 1
        if self._positions[src] == len(self.sources[src]):
            self._epochs[src], self._positions[src] = self._epochs[src] + 1, 0
        return src, doc, 0

    def _length(self, src: int, doc: int) -> int:
        return int(self.sources[src].lengths[doc])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        for _ in range(self.batch_size):
            segments, self._pending = next_row(self._next_doc, self._pending, self._length, self.seq_len)
            rows.append(segments)
        mine = rows[self._first_row : self._first_row + self._local]
        return materialize(mine, self.seq_len, self.pad_id, lambda src, doc, a, b: self.sources[src].get(doc, a, b))


class EvalBatches:
    """Every document of an eval set exactly once, in file order; iterate as often as needed."""

    def __init__(self, docs: Documents, seq_len, batch_size, *, pad_id=0, process_index=0, process_count=1):
        local = check_shape(seq_len, batch_size, process_index, process_count)
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
        stream = ((0, d, 0) for d in range(len(docs)))
        length = lambda src, doc: int(docs.lengths[doc])  # noqa: E731
        rows, pending = [], None
        while True:
            segments, pending = next_row(lambda: next(stream, None), pending, length, seq_len)
            if not segments:
                break
            rows.append(segments)
        rows += [[]] * (-len(rows) % batch_size)  # empty rows complete the last batch
        first = process_index * local
        self._batches = [rows[b + first : b + first + local] for b in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for rows in self._batches:
            yield materialize(rows, self.seq_len, self.pad_id, lambda src, doc, a, b: self.docs.get(doc, a, b))


# ---- entry points -----------------------------------------------------------------------------


def make_train_iterator(
    sources: list[str | DataSource] | str, tokenizer, seq_len: int, batch_size: int, seed: int, skip_bad_records: bool = False,
    process_index: int = 0, process_count: int = 1, *, num_proc: int | None = None, cache_dir: str | None = None,
) -> PackedIterator:  # fmt: skip
    """Packed, shuffled, mixed training batches from `path[:weight]` sources (or DataSources)."""
    specs = [sources] if isinstance(sources, (str, DataSource)) else list(sources)
    if not specs:
        raise UserError("no training data sources given")
    parsed = [s if isinstance(s, DataSource) else DataSource(*parse_source(s)) for s in specs]
    docs = [
        load_documents(s, tokenizer, skip_bad_records=skip_bad_records, num_proc=num_proc, cache_dir=cache_dir)
        for s in parsed
    ]
    it = PackedIterator(docs, seq_len, batch_size, seed, weights=[s.weight for s in parsed], pad_id=tokenizer.pad_id,
                        process_index=process_index, process_count=process_count)  # fmt: skip
    log.info("training data:\n%s", it.summary())
    return it


def make_eval_batches(
    path: str, tokenizer, seq_len: int, batch_size: int, *, process_index: int = 0, process_count: int = 1,
    skip_bad_records: bool = False, num_proc: int | None = None, cache_dir: str | None = None,
) -> EvalBatches:  # fmt: skip
    """Eval batches covering every document of `path` once (re-iterable, with len())."""
    docs = load_documents(path, tokenizer, skip_bad_records=skip_bad_records, num_proc=num_proc, cache_dir=cache_dir)
    log.info("eval data: %s", docs.summary())
    return EvalBatches(docs, seq_len, batch_size, pad_id=tokenizer.pad_id,
                       process_index=process_index, process_count=process_count)  # fmt: skip
