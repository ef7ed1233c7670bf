"""Durable file operations: fsync, atomic renames, deletion, and SHA-256 of files.

The primitives the save's switch and the restore's check are built from; this module
knows nothing of steps or manifests. A flush is skipped only where the file system
cannot do it (EINVAL, ENOTSUP, ...); every other error is raised, failing the save.
"""

import concurrent.futures
import errno
import hashlib
import os
import pathlib
import shutil

_HASH_CHUNK = 1 << 20
_POOL_BYTES = 8 << 20  # below this, hash files one after another (see hash_files)


def fsync(fd: int) -> None:
    """Flushes a file or folder to disk; where the file system cannot, does nothing.

    Other errors (EIO: the data did not reach the disk) propagate, failing the save.
    """
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


def fsync_dir(path: pathlib.Path) -> None:
    """Makes renames and new entries in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders
    try:
        fsync(fd)
    finally:
        os.close(fd)


def rename(source: pathlib.Path, target: pathlib.Path) -> None:
    """Renames atomically (both paths are in one folder) and makes the rename durable."""
    os.rename(source, target)
    fsync_dir(target.parent)


def remove_tree(path: pathlib.Path) -> None:
    """Deletes a folder (or file) and everything in it; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # Something could not be deleted: raise the error this time.
            shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hash_file(path: pathlib.Path, flush: bool) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file; with ``flush``, also flushes it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if flush:
            fsync(f.fileno())
    return size, digest.hexdigest()


def hash_files(
    folder: pathlib.Path, names: list[str], flush: bool = False
) -> dict[str, tuple[int, str]]:
    """Hashes ``folder/name`` for every name, several files at a time (hashlib drops the GIL).

    Small checkpoints that need no flush are hashed in this thread: starting a pool
    costs more than hashing a few megabytes.
    """
    if len(names) <= 1 or (not flush and _total_size(folder, names) < _POOL_BYTES):
        return {name: _hash_file(folder / name, flush) for name in names}
    with concurrent.futures.ThreadPoolExecutor(min(8, len(names))) as pool:
        results = pool.map(lambda name: _hash_file(folder / name, flush), names)
        return dict(zip(names, results))


def _total_size(folder: pathlib.Path, names: list[str]) -> int:
    """Bytes in ``folder/name`` over all names; a file that cannot be read counts as large
    (it is then read, and its error raised, the usual way)."""
    try:
        return sum((folder / name).stat().st_size for name in names)
    except OSError:
        return _POOL_BYTES
