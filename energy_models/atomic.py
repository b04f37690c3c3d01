"""Atomic file writing for both packages: a reader sees the old file or the new one, never a torn one.

The data goes to a temporary file in the target's directory, is flushed and fsync'ed, then
`os.replace`d over the target; on any failure the temporary file is removed and the old file is
left as it was. The temporary file is created like a normal `open(path, "w")` (mode 0666 minus
the umask), so results are as readable as any other file the user writes (`tempfile.mkstemp`
would leave them 0600). Lives in `energy_models`, the lower package, so both `energy_models`
(the SCALE-Sim cache) and `ddi_hw` use this one helper; standard library only (no torch), so it
also runs on the board.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write into (by any library: `df.to_csv`,
    `fig.savefig`, ...); when the block succeeds it replaces `path`, else it is removed.
    `suffix` lets writers that pick the format from the extension see the right one; `fsync=False`
    skips the flush to disk for files rewritten many times a second whose loss costs nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies, as in open()
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:  # the writer may not have synced: make the data durable first
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, payload: bytes, fsync: bool = True) -> None:
    """Replace `path` by `payload` atomically (see the module docstring)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync)
