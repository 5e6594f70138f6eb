"""Write a checkpoint directory so that only a finished one ever carries its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from nemo_jax.errors import UserError


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False, protect: tuple[Path, ...] = ()):
    """Yield an empty temporary directory beside `out`; rename it to `out` when the block succeeds.

    The tree is fsynced before the rename. A non-empty `out` is refused unless `force`; with `force`
    the old directory is replaced only after the new one is complete. On any failure (Ctrl-C
    included) the temporary directory is removed, so an interrupted conversion leaves nothing that
    looks complete. `protect` lists inputs that `out` must not be, or contain, since replacing it
    would delete them.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty (pass --force to replace it)")
    resolved = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == resolved or resolved in p.parents:
            raise UserError(f"{out}: refusing to write over the input {p}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)  # the data is on disk before the name says the checkpoint is complete
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        _fsync(out.parent)  # ... and so is the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files + ["."]:
            _fsync(os.path.join(dirpath, name))


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_libc = None


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Start writing a file's dirty pages (bytes [offset, offset + nbytes), 0: to the end) to disk
    without waiting for them (Linux sync_file_range; a no-op elsewhere).

    The fsync before the final rename then finds most of the data already on disk instead of
    writing it all at the end, after the conversion's own work.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def start_writeback_tree(root: Path, done: set) -> None:
    """`start_writeback` for every file under `root` not in `done` (which it extends)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if path in done:
                continue
            done.add(path)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                start_writeback(fd)
            finally:
                os.close(fd)
