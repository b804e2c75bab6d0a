"""Small file helpers shared by every writer: atomic writes, directory fsync and strict JSON."""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fsync_dir(path: Path) -> None:
    """fsync the directory `path`, so that the files created or renamed in it survive a crash
    (a file's own fsync does not cover its directory entry). A filesystem that cannot fsync a
    directory (EINVAL, ENOTSUP) is passed over; any other failure is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (inf, -inf, nan; numpy's too) replaced by None, and
    numpy scalars and arrays turned into Python numbers and lists: what strict JSON can hold."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars, torch scalars
        return finite(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def strict_dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (RFC 8259): a figure that is not finite is written as null, never as
    Infinity or NaN, which other parsers reject."""
    return json.dumps(finite(obj), allow_nan=False, **kw)
