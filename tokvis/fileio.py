"""One way to write a file a user may share: atomically, durably, with the user's umask.

Every file tokvis writes for a user (traces, run stores, fitted methods, tables, the weight
cache) goes through :func:`atomic_write`: the bytes go to a uniquely named temporary file in
the target's folder, are flushed and fsync'ed, then ``os.replace`` puts them in place, so a
reader sees either the old file or the new one, never a torn one, and an interrupted write
leaves nothing behind.  ``tempfile.mkstemp`` is not used on purpose: it creates ``0600`` files,
which colleagues on a shared server cannot read; ``open()`` applies the process umask.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"


def temp_path(path: str | os.PathLike) -> Path:
    """A unique temporary name next to ``path`` (same folder, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], *, mkdir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return the path.

    ``data`` is the content (bytes, or text written as UTF-8), or a callable that writes the file
    it is given (for writers that want a path, such as ``DataFrame.to_parquet``).  The file gets
    the permissions ``open()`` gives under the user's umask.  On any error the temporary file is
    removed and the previous content of ``path`` (if any) is untouched.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            blob = data.encode("utf-8") if isinstance(data, str) else data
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, start: int = 0) -> str:
    """SHA-256 (hex) of a file's bytes from offset ``start``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
