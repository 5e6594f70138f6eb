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

Order and resumption as in data.py: one source's pairs are shuffled with a permutation drawn from
(seed, epoch); several sources are mixed by weight (`path:weight`), each cycling through its own
permutations; `state()` / `restore()` continue with exactly the same batches. A source's `columns`
renames fields as for SFT records (e.g. `{chosen: accepted}`).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from nemo_jax.data import check_records, read_records, record_where
from nemo_jax.errors import UserError
from nemo_jax.packing import Mixture, check_shape
from nemo_jax.packing import materialize as materialize_rows
from nemo_jax.records import as_source, rename_columns, resolve

log = logging.getLogger(__name__)

KEYS = ("chosen", "rejected")


def is_preference_record(rec) -> bool:
    return isinstance(rec, dict) and "chosen" in rec and "rejected" in rec


def is_preference_source(source) -> bool:
    """Does a source hold preference pairs? (judged by its first record)"""
    source = as_source(source)
    for _, rec, _ in _records(resolve(source)[0], source.columns):
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


def _records(path: str, columns=()):
    """Yield (where, record or None, error) for each record of one file, with data.py's reader (every file
    kind it reads) and its names for records (`path:line` for JSON lines); `columns` renames fields."""
    check_records(path)
    for raw in read_records(path):
        where = record_where(path, raw["loc"])
        if raw["error"]:
            yield where, None, raw["error"]
            continue
        try:
            rec = json.loads(raw["raw"])
        except ValueError as e:
            yield where, None, f"malformed JSON: {e}"
            continue
        if isinstance(rec, dict):
            rec = {k: v for k, v in rec.items() if v is not None}  # parquet fills absent fields with nulls
            rec = rename_columns(rec, columns)
            for k in ("messages", "tools", "chosen", "rejected", "prompt"):
                if isinstance(rec.get(k), str) and rec[k][:1] in "[{":  # nested data stored as JSON text (parquet)
                    try:
                        rec[k] = json.loads(rec[k])
                    except ValueError:
                        pass
        yield where, rec, None


class Pairs:
    """Tokenized pairs: per pair the two sides' ids and masks (numpy), and where each record was."""

    def __init__(self, sides: list, where: list[str], name: str, bad: int = 0):
        self.sides, self.where, self.name, self.bad = sides, where, name, bad

    def __len__(self) -> int:
        return len(self.sides)

    def summary(self) -> str:
        skipped = f", {self.bad} bad records skipped" if self.bad else ""
        return f"{self.name}: {len(self)} preference pairs{skipped}"


def load_pairs(source, tokenizer, seq_len: int, *, skip_bad_records: bool = False) -> Pairs:
    """Every pair of one source (a path or DataSource), checked to fit a row of `seq_len`."""
    src = as_source(source)
    sides, where, bad = [], [], 0
    for path in resolve(src):
        for loc, rec, error in _records(path, src.columns):
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
    if not sides:
        raise UserError(f"{src}: no preference pairs")
    return Pairs(sides, where, str(src), bad)


# ---- batches -----------------------------------------------------------------------------------


def materialize(pairs, rows: list, seq_len: int, pad_id: int) -> dict:
    """One batch: row r holds pair rows[r] of `pairs` (a Pairs), or (source, pair) of `pairs` (a list of
    Pairs); None: an empty row. The pair's sides are the row's two segments (packing.materialize)."""
    def sides(p):
        return pairs.sides[p] if isinstance(pairs, Pairs) else pairs[p[0]].sides[p[1]]

    def get(_, side, start, stop):  # side: (pair, 0 for chosen or 1 for rejected)
        ids, mask = sides(side[0])[2 * side[1] : 2 * side[1] + 2]
        return ids[start:stop], mask[start:stop]

    segments = [[] if p is None else [(0, (p, k), 0, len(sides(p)[2 * k]) - 1) for k in (0, 1)] for p in rows]
    return materialize_rows(segments, seq_len, pad_id, get)


class PairIterator:
    """Endless shuffled training batches of pairs; each process gets its block of each global batch.

    One source: its pairs in a permutation drawn from (seed, epoch). Several: each pair is drawn from
    source i with probability w_i / sum(w), as data.py mixes documents, and each source cycles through
    its own permutations, drawn from (seed, source, epoch)."""

    def __init__(self, pairs, seq_len: int, batch_size: int, seed: int, *, weights=None, pad_id=0,
                 process_index=0, process_count=1):  # fmt: skip
        self.sources = [pairs] if isinstance(pairs, Pairs) else list(pairs)
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, int(seed), pad_id
        self._local = check_shape(seq_len, batch_size, process_index, process_count)
        self._first = process_index * self._local
        self._mix = Mixture(self.seed, weights, len(self.sources))
        self._perms = {}
        if len(self.sources) == 1:
            self.restore({"seed": self.seed, "epoch": 0, "position": 0, "num_pairs": len(self.sources[0])})
        else:
            n = len(self.sources)
            self.restore({"seed": self.seed, "draws": 0, "epochs": [0] * n, "positions": [0] * n,
                          "num_pairs": [len(s) for s in self.sources]})  # fmt: skip

    @property
    def pairs(self) -> Pairs:
        return self.sources[0]

    def state(self) -> dict:
        if len(self.sources) == 1:  # the single-source form (as runs before several sources saved it)
            return {"seed": self.seed, "epoch": self._epochs[0], "position": self._positions[0],
                    "num_pairs": len(self.sources[0])}  # fmt: skip
        return {"seed": self.seed, "draws": self._draws, "epochs": list(self._epochs),
                "positions": list(self._positions), "num_pairs": [len(s) for s in self.sources]}  # fmt: skip

    def restore(self, state: dict) -> None:
        sizes = len(self.sources[0]) if len(self.sources) == 1 else [len(s) for s in self.sources]
        if state.get("seed") != self.seed or state.get("num_pairs") != sizes:
            raise UserError(f"data state is for seed {state.get('seed')} and {state.get('num_pairs')} preference "
                            f"pairs, but this run has seed {self.seed} and {sizes}")
        if len(self.sources) == 1:
            self._draws, self._epochs, self._positions = 0, [int(state["epoch"])], [int(state["position"])]
        else:
            self._draws = int(state["draws"])
            self._epochs, self._positions = list(map(int, state["epochs"])), list(map(int, state["positions"]))

    def summary(self) -> str:
        return "\n".join(f"{s.summary()} (weight {p:.3f})" for s, p in zip(self.sources, self._mix.p))

    def _next_pair(self) -> tuple[int, int]:
        src = self._mix.source(self._draws)
        self._draws += len(self.sources) > 1  # one source: the state holds no draws
        epoch = self._epochs[src]
        if self._perms.get(src, (None,))[0] != epoch:
            key = [self.seed, 3, epoch] if len(self.sources) == 1 else [self.seed, 3, src, epoch]
            self._perms[src] = (epoch, np.random.default_rng(key).permutation(len(self.sources[src])))
        p = int(self._perms[src][1][self._positions[src]])
        self._positions[src] += 1
        if self._positions[src] == len(self.sources[src]):
            self._epochs[src], self._positions[src] = epoch + 1, 0
        return src, p

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self._next_pair() for _ in range(self.batch_size)]
        return materialize(self.sources, rows[self._first:self._first + self._local], self.seq_len, self.pad_id)


class PairEvalBatches:
    """Every pair once, in file order; the last batch completed with empty rows."""

    def __init__(self, pairs: Pairs, seq_len: int, batch_size: int, *, pad_id=0, process_index=0, process_count=1):
        local = check_shape(seq_len, batch_size, process_index, process_count)
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
    """Training batches of pairs from `sources` (paths or DataSources, mixed by their weights)."""
    sources = [as_source(s) for s in ([sources] if not isinstance(sources, (list, tuple)) else sources)]
    pairs = [load_pairs(s, tokenizer, seq_len, skip_bad_records=skip_bad_records) for s in sources]
    it = PairIterator(pairs, seq_len, batch_size, seed, weights=[s.weight for s in sources], pad_id=tokenizer.pad_id,
                      process_index=process_index, process_count=process_count)  # fmt: skip
    log.info("preference data:\n%s", it.summary())
    return it


def make_pair_eval_batches(source, tokenizer, seq_len, batch_size, *, process_index=0, process_count=1,
                           skip_bad_records=False) -> PairEvalBatches:
    pairs = load_pairs(source, tokenizer, seq_len, skip_bad_records=skip_bad_records)
    return PairEvalBatches(pairs, seq_len, batch_size, pad_id=tokenizer.pad_id, process_index=process_index,
                           process_count=process_count)
