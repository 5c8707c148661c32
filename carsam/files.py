"""Files: atomic writes (a temporary file beside the target, then a rename, so readers and a crash half-way
never see a partial file) and SHA-256 of files, memoised for files hashed again and again (checkpoints,
cached images).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def replace_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path` (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as err:  # e.g. a full disk: say which file, as `[Errno 28]` alone does not
        raise OSError(err.errno, f"{err.strerror or err}: cannot write {path}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return replace_atomic(path, write)

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


def memoised_file_sha256(path: str | Path) -> str:
    """`file_sha256` memoised on (resolved path, size, mtime_ns): a sweep hashes a 2.5 GB vit_h checkpoint,
    or a cached image, once; a touched file is hashed again, a replaced one gets its new hash."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _memoised_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)
