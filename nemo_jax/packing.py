"""Packing next-token pairs of documents into rows: shared by the in-memory (data.py), streamed
(streaming.py) and preference (preference.py) pipelines. See data.py's docstring for the rules."""

import numpy as np

from nemo_jax.config import MAX_DOCUMENTS_PER_ROW
from nemo_jax.errors import UserError


def next_row(next_doc, pending, length, seq_len):
    """Fill one row: -> (segments [(source, doc, first pair, pairs)], piece left over or None).

    A piece is (source, doc, offset): document `doc` from pair `offset` on. `pending` is the piece
    the previous row could not take, `next_doc()` gives (source, doc, 0) or None at the end,
    `length(source, doc)` is a document's token count (it has one pair fewer).
    """
    segments, free = [], seq_len
    while free and len(segments) < MAX_DOCUMENTS_PER_ROW:  # the GPU kernel's table of documents (config.py)
        piece = pending if pending is not None else next_doc()
        if piece is None:
            return segments, None
        src, doc, off = piece
        left = length(src, doc) - 1 - off
        if left <= free:
            segments.append((src, doc, off, left))
            free, pending = free - left, None
        elif left > seq_len:  # longer than any row: cut it here
            segments.append((src, doc, off, free))
            free, pending = 0, (src, doc, off + free)
        else:
            return segments, piece
    return segments, pending


def empty_batch(n_rows: int, seq_len: int, pad_id: int) -> dict:
    """The step's batch arrays, all padding: rows of segment 0 with no loss."""
    shape = (n_rows, seq_len)
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }


def materialize(rows, seq_len, pad_id, get) -> dict:
    """The batch of `rows` (next_row's segments); `get(source, doc, start, stop)` -> (ids, mask)."""
    batch = empty_batch(len(rows), seq_len, pad_id)
    for r, segments in enumerate(rows):
        t = 0
        for k, (src, doc, off, n) in enumerate(segments, 1):
            ids, mask = get(src, doc, off, off + n + 1)
            batch["tokens"][r, t : t + n] = ids[:-1]
            batch["targets"][r, t : t + n] = ids[1:]
            batch["loss_mask"][r, t : t + n] = mask[1:]
            batch["segment_ids"][r, t : t + n] = k
            batch["positions"][r, t : t + n] = np.arange(n)
            t += n
    return batch


def check_shape(seq_len, batch_size, process_index, process_count) -> int:
    """-> this process's rows of the global batch; UserError for shapes that cannot work."""
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise UserError(f"batch_size {batch_size} must split evenly over {process_count} processes")
    return batch_size // process_count


class Mixture:
    """Which source each draw comes from: source i with probability w_i / sum(w), draw n's choice a pure
    function of (seed, n), so a restored draw count continues the same sequence. One stream for every
    pipeline (in-memory, streamed, preference pairs)."""

    BLOCK = 4096  # draws are generated in blocks of this many

    def __init__(self, seed: int, weights, n_sources: int):
        """`weights`: one per source (None: equal)."""
        w = np.asarray(weights if weights is not None else [1.0] * n_sources, np.float64)
        if int(seed) < 0 or not n_sources or len(w) != n_sources or not (w > 0).all():
            raise UserError(f"need a seed >= 0 and one positive weight per source, got seed {seed}, weights {list(w)}")
        self.seed, self.p, self._cache = int(seed), w / w.sum(), {}

    def __len__(self) -> int:
        return len(self.p)

    def source(self, draw: int) -> int:
        if len(self.p) == 1:
            return 0
        block, i = divmod(draw, self.BLOCK)
        if block not in self._cache:
            rng = np.random.default_rng([self.seed, 1, block])
            self._cache = {block: rng.choice(len(self.p), self.BLOCK, p=self.p)}
        return int(self._cache[block][i])
