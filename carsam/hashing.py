"""SHA-256 of files, and its memoised form for files hashed again and again (checkpoints, cached images)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=65536)
def _memoised_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def cached_file_sha256(path: str | Path) -> str:
    """`file_sha256` memoised on (resolved path, size, mtime_ns): a sweep hashes a 2.5 GB vit_h checkpoint,
    or a cached image, once; a touched file is hashed again, a replaced one gets its new hash."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _memoised_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


__all__ = ["cached_file_sha256", "file_sha256"]
