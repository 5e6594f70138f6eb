"""Preference pairs for DPO (train.objective: dpo): records -> tokenized pairs -> batches.

Records (JSON lines, a JSON array or parquet; any source data.py reads, records.resolve)
    {"messages": [...prompt turns...], "chosen": {assistant message}, "rejected": {assistant message},
     "tools": [...]}
    {"prompt": str, "chosen": str, "rejected": str}
The prompt is a conversation ending in a user or tool turn (a string prompt is one user turn);
`chosen` and `rejected` are assistant messages (a string is a text reply, a message may carry
`tool_calls`, a one-message list is taken as that message), rendered with the same V3 template as SFT
records (tokenizer.py), tools included, so a pair may prefer one tool call over another.

Tokens
    Each side is `encode_chat(prompt + [answer])`. The prompt's own assistant turns get weight 0, so
    a side's loss mask covers exactly its answer: the tokens after `encode_chat_prompt(prompt)`, the
    closing `</s>` included. The prompt's tokens are the same on both sides and trained on neither.

Batches: the keys of data.py's batches, [B, T], one pair per row
    segment 1 is prompt + chosen, segment 2 is prompt + rejected (next-token pairs, positions from 0
    in each, no attention between them), so a pair's log-probability under a model is the sum of
    its segment's masked token log-probabilities (train_loop.dpo_sums). Rows of the last eval batch
    that hold no pair are empty (all-zero loss mask) and count for nothing.
A pair longer than a row (both sides' next-token pairs > seq_len) is an error naming its record.

Order and resumption as in data.py: the pairs of all sources are shuffled with a permutation drawn
from (seed, epoch); `state()` / `restore()` continue with exactly the same batches.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq

from nemo_jax.packing import empty_batch
from nemo_jax.errors import UserError
from nemo_jax.records import as_source, resolve

log = logging.getLogger(__name__)

KEYS = ("chosen", "rejected")


def is_preference_record(rec) -> bool:
    return isinstance(rec, dict) and "chosen" in rec and "rejected" in rec


def is_preference_source(source) -> bool:
    """Does a source hold preference pairs? (judged by its first record)"""
    for _, rec, _ in _records(resolve(source)[0]):
        return is_preference_record(rec)
    return False


def pair_messages(rec) -> tuple[list, list, list | None]:
    """A preference record -> (prompt messages, [chosen message, rejected message], tools)."""
    if not is_preference_record(rec):
        found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise UserError(f"a preference record needs 'chosen' and 'rejected' (and 'messages' or 'prompt'); found {found}")
    if (rec.get("messages") is None) == (rec.get("prompt") is None):
        raise UserError("a preference record needs exactly one of 'messages' (prompt turns) and 'prompt'")
    prompt = rec["messages"] if rec.get("messages") is not None else rec["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise UserError(f"the prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}")
    # context, not trained: the loss mask then covers the answer alone
    prompt = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
    answers = [_answer(k, rec[k]) for k in KEYS]
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"'tools' must be a list, got {type(tools).__name__}")
    return prompt, answers, tools


def _answer(key: str, v) -> dict:
    if isinstance(v, str):
        return {"role": "assistant", "content": v}
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if not isinstance(v, dict) or v.get("role", "assistant") != "assistant":
        raise UserError(f"'{key}' must be an assistant message (or a string), got {json.dumps(v)[:80]}")
    return {"role": "assistant", **{k: x for k, x in v.items() if x is not None and k != "weight"}}


def encode_pair(tokenizer, rec) -> tuple[list[int], list[bool], list[int], list[bool]]:
    """(chosen ids, chosen loss mask, rejected ids, rejected loss mask) of one record."""
    prompt, answers, tools = pair_messages(rec)
    out = []
    for k, answer in zip(KEYS, answers):
        try:
            ids, mask = tokenizer.encode_chat(prompt + [answer], tools)
        except UserError as e:
            raise UserError(f"{k}: {e}") from None
        out += [ids, mask]
    return tuple(out)


# ---- reading -----------------------------------------------------------------------------------


def _records(path: str):
    """Yield (where, record or None, error) for each record of one file: `path:line` for JSON lines."""
    if path.endswith(".parquet"):
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                for k in ("messages", "tools", "chosen", "rejected", "prompt"):
                    if isinstance(rec.get(k), str) and rec[k][:1] in "[{":  # nested data stored as JSON text
                        try:
                            rec[k] = json.loads(rec[k])
                        except ValueError:
                            pass
                yield f"{path}: row {row}", rec, None
        return
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: malformed JSON array: {e}") from None
        for i, rec in enumerate(records, 1):
            yield f"{path}: record {i}", rec, None
        return
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line), None
            except (ValueError, UnicodeDecodeError) as e:
                yield f"{path}:{line_no}", None, f"malformed JSON: {e}"


class Pairs:
    """Tokenized pairs: per pair the two sides' ids and masks (numpy), and where each record was."""

    def __init__(self, sides: list, where: list[str], name: str, bad: int = 0):
        self.sides, self.where, self.name, self.bad = sides, where, name, bad

    def __len__(self) -> int:
        return len(self.sides)

    def summary(self) -> str:
        skipped = f", {self.bad} bad records skipped" if self.bad else ""
        return f"{self.name}: {len(self)} preference pairs{skipped}"


def load_pairs(sources, tokenizer, seq_len: int, *, skip_bad_records: bool = False) -> Pairs:
    """Every pair of `sources` (paths or DataSources), checked to fit a row of `seq_len`."""
    sources = [sources] if not isinstance(sources, (list, tuple)) else list(sources)
    sides, where, bad = [], [], 0
    for source in sources:
        src = as_source(source)
        if src.weight not in (None, 1, 1.0):
            raise UserError(f"{src.path}: weighted sources are not supported for preference data "
                            "(train.objective: dpo): the pairs of all sources are shuffled together")
        for path in resolve(src):
            for loc, rec, error in _records(path):
                try:
                    if error:
                        raise UserError(error)
                    ids_c, m_c, ids_r, m_r = encode_pair(tokenizer, rec)
                    need = len(ids_c) + len(ids_r) - 2
                    if need > seq_len:
                        raise UserError(f"the pair needs {need} positions (chosen and rejected side by side), more "
                                        f"than train.seq_len {seq_len}")
                except UserError as e:
                    if not skip_bad_records:
                        raise UserError(f"{loc}: {e}") from None
                    bad += 1
                    continue
                sides.append((np.asarray(ids_c, np.int32), np.asarray(m_c, bool),
                              np.asarray(ids_r, np.int32), np.asarray(m_r, bool)))
                where.append(loc)
    name = ", ".join(as_source(s).path for s in sources)
    if not sides:
        raise UserError(f"{name}: no preference pairs")
    return Pairs(sides, where, name, bad)


# ---- batches -----------------------------------------------------------------------------------


def materialize(pairs: Pairs, rows: list[int | None], seq_len: int, pad_id: int) -> dict:
    """One batch: row r holds pair rows[r] (None: an empty row)."""
    batch = empty_batch(len(rows), seq_len, pad_id)
    for r, p in enumerate(rows):
        if p is None:
            continue
        ids_c, m_c, ids_r, m_r = pairs.sides[p]
        t = 0
        for seg, (ids, mask) in enumerate(((ids_c, m_c), (ids_r, m_r)), 1):
            n = len(ids) - 1
            batch["tokens"][r, t:t + n] = ids[:-1]
            batch["targets"][r, t:t + n] = ids[1:]
            batch["loss_mask"][r, t:t + n] = mask[1:]
            batch["segment_ids"][r, t:t + n] = seg
            batch["positions"][r, t:t + n] = np.arange(n)
            t += n
    return batch


def _local_rows(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size % process_count:
        raise UserError(f"batch_size {batch_size} must split evenly over {process_count} processes")
    return batch_size // process_count


class PairIterator:
    """Endless shuffled training batches of pairs; each process gets its block of each global batch."""

    def __init__(self, pairs: Pairs, seq_len: int, batch_size: int, seed: int, *, pad_id=0,
                 process_index=0, process_count=1):
        self.pairs, self.seq_len, self.batch_size, self.seed, self.pad_id = pairs, seq_len, batch_size, int(seed), pad_id
        self._local = _local_rows(batch_size, process_index, process_count)
        self._first = process_index * self._local
        self._perm = None
        self.restore({"seed": self.seed, "epoch": 0, "position": 0, "num_pairs": len(pairs)})

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position, "num_pairs": len(self.pairs)}

    def restore(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("num_pairs") != len(self.pairs):
            raise UserError(f"data state is for seed {state.get('seed')} and {state.get('num_pairs')} preference "
                            f"pairs, but this run has seed {self.seed} and {len(self.pairs)}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def summary(self) -> str:
        return self.pairs.summary()

    def _next_pair(self) -> int:
        if self._perm is None or self._perm[0] != self._epoch:
            self._perm = (self._epoch, np.random.default_rng([self.seed, 3, self._epoch]).permutation(len(self.pairs)))
        p = int(self._perm[1][self._position])
        self._position += 1
        if self._position == len(self.pairs):
            self._epoch, self._position = self._epoch + 1, 0
        return p

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self._next_pair() for _ in range(self.batch_size)]
        return materialize(self.pairs, rows[self._first:self._first + self._local], self.seq_len, self.pad_id)


class PairEvalBatches:
    """Every pair once, in file order; the last batch completed with empty rows."""

    def __init__(self, pairs: Pairs, seq_len: int, batch_size: int, *, pad_id=0, process_index=0, process_count=1):
        local = _local_rows(batch_size, process_index, process_count)
        rows = list(range(len(pairs))) + [None] * (-len(pairs) % batch_size)
        first = process_index * local
        self.pairs, self.seq_len, self.pad_id = pairs, seq_len, pad_id
        self._batches = [rows[b + first:b + first + local] for b in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for rows in self._batches:
            yield materialize(self.pairs, rows, self.seq_len, self.pad_id)


def make_pair_iterator(sources, tokenizer, seq_len, batch_size, seed, skip_bad_records=False,
                       process_index=0, process_count=1) -> PairIterator:
    pairs = load_pairs(sources, tokenizer, seq_len, skip_bad_records=skip_bad_records)
    it = PairIterator(pairs, seq_len, batch_size, seed, pad_id=tokenizer.pad_id, process_index=process_index,
                      process_count=process_count)
    log.info("preference data: %s", it.summary())
    return it


def make_pair_eval_batches(source, tokenizer, seq_len, batch_size, *, process_index=0, process_count=1,
                           skip_bad_records=False) -> PairEvalBatches:
    pairs = load_pairs([source], tokenizer, seq_len, skip_bad_records=skip_bad_records)
    return PairEvalBatches(pairs, seq_len, batch_size, pad_id=tokenizer.pad_id, process_index=process_index,
                           process_count=process_count)
