"""Checkpoints of training state (params + optimizer state) on top of orbax.

Orbax restores into whatever target it is given and casts silently: a bfloat16
momentum saved by ``lion(mu_dtype=jnp.bfloat16)`` comes back as float32 when the
target was built by ``lion()``, and the run continues with a different optimizer
than the one that was checkpointed. These helpers write, next to the arrays, the
path, shape and dtype of every leaf, and :func:`restore_checkpoint` refuses a target
that differs in any of them, naming each difference, before restoring any array.

Guarantees (checkpoint format 2):

* **No lost step.** A save writes the new copy beside the old ones, in
  ``directory/<step>.lion_optax-saving``, and switches it in by renaming only once
  it is complete and checked; an overwrite first renames the old copy to
  ``<step>.lion_optax-replaced`` and deletes it only after the new copy is in place.
  Whatever instant a save is killed at, the newest previously saved state is on
  disk complete, and :func:`latest_step` and :func:`restore_checkpoint` find it
  (or the new state, if its save got as far as the switch) and restore it bit for
  bit. Files and renames are flushed with fsync before each switch, so this also
  holds across an operating-system crash or power loss on file systems that honour
  fsync; the tests check it by SIGKILL at random moments and at every rename.
* **No half-written step.** A step counts only once its manifest
  (``lion_optax_manifest.json``, written last, itself checksummed) exists and every
  file it lists is present with its recorded size. :func:`latest_step` returns only
  such steps; ``restore_checkpoint(step=None)`` falls back to the newest one (with a
  warning naming any newer step folder it passed over); asking for an incomplete
  step by number raises an error that says why it is incomplete. A manifest changed
  in any byte (unreadable, not UTF-8 JSON, failing its checksum, laid out otherwise,
  or with a field of the wrong type) makes its step damaged in the same way, never an
  exception from the reader. Leftover temporary folders of killed saves are ignored
  by readers and removed by the next save.
* **No silent corruption.** The manifest holds the SHA-256 of every file of the
  step. :func:`restore_checkpoint` recomputes them before using the files (one
  extra read of the checkpoint) and raises :class:`CheckpointCorruptError` naming
  each file that differs. Orbax has no such check of its own: OCDBT checksums
  its index (a flipped byte there is an error) but not the array bytes, and a
  flipped byte in an array data file restores silently as different numbers.
* **Failed saves leave nothing.** Leaves that cannot be stored are refused before
  anything is written; an error during the write removes the partial copy and
  leaves the earlier checkpoints as they were. Zero-size leaves are supported: they
  have no bytes, so only their shape and dtype are recorded and restore rebuilds
  them.

One process (one job) saves into a directory at a time. Other processes may
restore while it saves, except the very step being overwritten. In a multi-host
job every process calls :func:`save_checkpoint`; process 0 alone renames and
deletes folders, between barriers, and every process checks the files on restore.
Checkpoints of format 1 (lion_optax before manifests) are not restored: they
cannot be checked; restore them with the version that wrote them and save again.

Layout: ``directory/<step>/`` holds an orbax composite checkpoint with the items
``arrays`` (the leaves with at least one element, flattened; absent when there is
none) and ``lion_optax`` (a JSON description of the tree), plus the manifest.
"""

import concurrent.futures
import errno
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import warnings
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 2
_ARRAYS = 'arrays'
_SPEC = 'lion_optax'
_MANIFEST = 'lion_optax_manifest.json'
_SAVING = '.lion_optax-saving'
_REPLACED = '.lion_optax-replaced'
# What killed saves leave beside the step folders: ours (staging copies, old copies being
# replaced, orbax's temporary folders of our staging copies) and orbax's own temporary
# folders from format 1 (``<step>.orbax-checkpoint-tmp...``).
_LEFTOVER = re.compile(r'^(\d+)\.(lion_optax-|orbax-checkpoint-tmp)')
_HASH_CHUNK = 1 << 20
_POOL_BYTES = 8 << 20  # below this, hash files one after another (see _hash_files)
_barrier_ids = itertools.count()


class CheckpointMismatchError(ValueError):
    """A checkpoint's tree, shapes or dtypes differ from the restore target."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files differ from what its save recorded in the manifest.

    Raised by :func:`restore_checkpoint` when a file's SHA-256 or size differs
    from the manifest, a file the manifest lists is missing, or the manifest
    itself is damaged. Nothing is restored from such a step. It is a
    ``ValueError`` like :class:`CheckpointMismatchError` but not a subclass of it:
    a mismatch means the *target* is wrong and the checkpoint is fine, while this
    means the *checkpoint* is wrong whatever the target, and code that reacts to a
    mismatch (for example by building the target another way) must not swallow it.

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax, lion_optax.checkpoint
      >>> from lion_optax.checkpoint import CheckpointCorruptError
      >>> folder = tempfile.mkdtemp()
      >>> state = {'w': jnp.arange(4.0)}
      >>> saved = lion_optax.checkpoint.save_checkpoint(folder, 1, state)
      >>> data = max((p for p in (saved / 'arrays').rglob('*') if p.is_file()),
      ...            key=lambda p: p.stat().st_size)
      >>> raw = bytearray(data.read_bytes()); raw[len(raw) // 2] ^= 0x01
      >>> _ = data.write_bytes(bytes(raw))
      >>> try:
      ...     lion_optax.checkpoint.restore_checkpoint(folder, state)
      ... except CheckpointCorruptError as error:
      ...     print(str(error).splitlines()[0])  # doctest: +ELLIPSIS
      The checkpoint for step 1 at .../1 is corrupt (1 file(s) differ from its manifest):
    """


def _as_abstract(leaf: Any) -> Any:
    """An array or ``jax.ShapeDtypeStruct`` as is; a Python or NumPy scalar as an array."""
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
        return leaf
    return jax.numpy.asarray(leaf)


def _leaf_spec(leaf: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of an array, ``jax.ShapeDtypeStruct`` or scalar."""
    leaf = _as_abstract(leaf)
    return tuple(int(d) for d in leaf.shape), str(leaf.dtype)


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
    return paths, [leaf for _, leaf in leaves_with_paths], treedef


def _check_step(step: Any) -> int:
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f'step must be an int >= 0, got {step!r}.')
    return int(step)


# ---------------------------------------------------------------------------
# Files: checksums, durable writes, the manifest.
# ---------------------------------------------------------------------------


def _fsync(fd: int) -> None:
    """Flushes a file or folder to disk; where the file system cannot, does nothing.

    Other errors (EIO: the data did not reach the disk) propagate, failing the save.
    """
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes renames and new entries in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: pathlib.Path, fsync: bool) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file; with ``fsync``, also flushes it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            _fsync(f.fileno())
    return size, digest.hexdigest()


def _hash_files(
    folder: pathlib.Path, names: list[str], fsync: bool = False
) -> dict[str, tuple[int, str]]:
    """Hashes ``folder/name`` for every name, several files at a time (hashlib drops the GIL).

    Small checkpoints that need no fsync are hashed in this thread: starting a pool
    costs more than hashing a few megabytes.
    """
    if len(names) <= 1 or (not fsync and _total_size(folder, names) < _POOL_BYTES):
        return {name: _hash_file(folder / name, fsync) for name in names}
    with concurrent.futures.ThreadPoolExecutor(min(8, len(names))) as pool:
        results = pool.map(lambda name: _hash_file(folder / name, fsync), names)
        return dict(zip(names, results))


def _total_size(folder: pathlib.Path, names: list[str]) -> int:
    """Bytes in ``folder/name`` over all names; a file that cannot be read counts as large
    (it is then read, and its error raised, the usual way)."""
    try:
        return sum((folder / name).stat().st_size for name in names)
    except OSError:
        return _POOL_BYTES


def _files_of(folder: pathlib.Path) -> list[str]:
    """Every regular file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            relative = (pathlib.Path(root) / name).relative_to(folder).as_posix()
            if relative != _MANIFEST and not relative.startswith(_MANIFEST + '.'):
                names.append(relative)
    return sorted(names)


def _manifest_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_manifest(folder: pathlib.Path, step: int) -> None:
    """Hashes and flushes every file of ``folder``, then writes its manifest atomically."""
    hashes = _hash_files(folder, _files_of(folder), fsync=True)
    body = {
        'format_version': FORMAT_VERSION,
        'step': step,
        'files': {name: [size, sha] for name, (size, sha) in hashes.items()},
    }
    manifest = dict(body, sha256=_manifest_digest(body))
    partial = folder / (_MANIFEST + '.partial')
    with open(partial, 'w', encoding='utf-8') as f:
        f.write(_manifest_text(manifest))
        f.flush()
        _fsync(f.fileno())
    os.replace(partial, folder / _MANIFEST)
    _fsync_dir(folder)


def _manifest_text(manifest: dict[str, Any]) -> str:
    """The exact text :func:`_write_manifest` writes for ``manifest``."""
    return json.dumps(manifest, indent=1, sort_keys=True)


_SHA256_HEX = re.compile(r'^[0-9a-f]{64}$')


def _parse_manifest(raw: bytes) -> tuple[str, Any]:
    """``('complete', {'step', 'format_version', 'files': {name: (size, sha)}})`` or why not.

    Checks every byte: the text must be UTF-8, JSON, carry its own checksum, and be
    laid out exactly as :func:`_write_manifest` lays it out (so a byte changed where
    JSON ignores it, e.g. in whitespace, is caught too); every field must have the
    type a save writes. Returns ``('damaged', reason)`` or ``('in another format',
    reason)`` otherwise, never raises: a damaged manifest must make its step skipped
    or refused by name, not crash the reader.
    """
    try:
        manifest = json.loads(raw.decode('utf-8'))
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting is a RecursionError.
    except (ValueError, RecursionError) as error:
        return 'damaged', f'it is not UTF-8 JSON ({type(error).__name__}: {error})'
    if not isinstance(manifest, dict):
        return 'damaged', f'it holds a JSON {type(manifest).__name__}, not an object'
    version = manifest.get('format_version')
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        return 'in another format', (
            f'its manifest has format {version!r}; this version of lion_optax reads '
            f'format {FORMAT_VERSION}. Restore it with the version that wrote it'
        )
    body = {k: v for k, v in manifest.items() if k != 'sha256'}
    if manifest.get('sha256') != _manifest_digest(body):
        return 'damaged', 'its own checksum does not match'
    if _manifest_text(manifest).encode('utf-8') != raw:
        return 'damaged', 'its bytes are not laid out as its save wrote them'
    files = body.get('files')
    if set(body) != {'format_version', 'step', 'files'} or not isinstance(files, dict):
        return 'damaged', (
            f'it has the keys {sorted(manifest)}; a save writes files, format_version, '
            'sha256 and step, with files an object'
        )
    for key in ('format_version', 'step'):
        if not isinstance(body[key], int) or isinstance(body[key], bool):
            return 'damaged', f'its {key} is {body[key]!r}, not an int'
    checked = {}
    for name, entry in files.items():
        parts = name.split('/')
        if name == _MANIFEST or not all(part not in ('', '.', '..') for part in parts):
            return 'damaged', f'it lists {name!r}, which is not a file path inside the step'
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], int)
            and not isinstance(entry[0], bool)
            and entry[0] >= 0
            and isinstance(entry[1], str)
            and _SHA256_HEX.match(entry[1])
        ):
            return 'damaged', (
                f'its entry for {name} is {entry!r}, not [size in bytes, SHA-256 hex]'
            )
        checked[name] = (entry[0], entry[1])
    return 'complete', dict(body, files=checked)


def _inspect(folder: pathlib.Path, step: int) -> tuple[str, Any]:
    """Whether ``folder`` holds a complete copy of ``step``, without reading array data.

    Returns ``('complete', manifest)`` or ``(status, reason)`` with status
    ``'incomplete'`` (no manifest: its save did not finish), ``'damaged'`` (a
    manifest, but it or the files it lists do not check out: unreadable, not what
    its save wrote, missing, or of another size) or ``'in another format'``
    (written by another version of lion_optax). Never raises for what is on disk.
    """
    path = folder / _MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        try:
            old = json.loads((folder / _SPEC / 'metadata').read_text(encoding='utf-8'))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get('format_version') == 1:
            return 'in another format', (
                'it was written by an older lion_optax (checkpoint format 1, without '
                'manifest or checksums, whose saves could be left half-written), so its '
                'completeness and contents cannot be checked; this version reads format '
                f'{FORMAT_VERSION}. Restore it with the version that wrote it and save it '
                'again with this one'
            )
        return 'incomplete', (
            f'it has no {_MANIFEST}, which a save writes last: the save that created '
            'it was interrupted (killed) before it finished, or the folder was not '
            'written by lion_optax.checkpoint.save_checkpoint'
        )
    except OSError as error:
        return 'damaged', f'its manifest cannot be read ({error})'
    status, detail = _parse_manifest(raw)
    if status == 'damaged':
        return 'damaged', f'its manifest {path} is damaged ({detail})'
    if status != 'complete':
        return status, detail
    if detail['step'] != step:
        return 'damaged', (
            f'its manifest says step {detail["step"]!r}, not {step}: the folder was '
            'renamed or copied under another step'
        )
    for name, (size, _) in detail['files'].items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return 'damaged', f'{name}, listed in its manifest, is missing'
        if actual != size:
            return 'damaged', f'{name} has {actual} bytes; its save wrote {size}'
    return 'complete', detail


# ---------------------------------------------------------------------------
# Which folder holds a step.
# ---------------------------------------------------------------------------


def _copies(directory: pathlib.Path, step: int) -> list[pathlib.Path]:
    """Where a complete copy of ``step`` may be: its folder, then the old copy an
    overwrite renamed aside (used only if a save was killed between its renames)."""
    return [directory / str(step), directory / f'{step}{_REPLACED}']


def _find(
    directory: pathlib.Path, step: int
) -> tuple[pathlib.Path | None, Any, list[tuple[str, str]]]:
    """``(folder, manifest, [])`` for a complete copy of ``step``, else ``(None, None, problems)``.

    ``problems`` holds ``(status, reason)`` for the step folder when there is one and
    it is not complete (see :func:`_inspect`).
    """
    problems = []
    for candidate in _copies(directory, step):
        if not candidate.is_dir():
            continue
        status, detail = _inspect(candidate, step)
        if status == 'complete':
            return candidate, detail, []
        if candidate.name == str(step):
            problems.append((status, detail))
    return None, None, problems


def _candidate_steps(directory: pathlib.Path) -> list[int]:
    """Steps with a folder or a renamed-aside old copy, newest first."""
    if not directory.is_dir():
        return []
    steps = set()
    for entry in directory.iterdir():
        name = entry.name
        if name.endswith(_REPLACED):
            name = name[: -len(_REPLACED)]
        if name.isdigit() and name.isascii():
            steps.add(int(name))
    return sorted(steps, reverse=True)


def _newest(directory: pathlib.Path) -> tuple[int | None, pathlib.Path | None, Any, list[str]]:
    """The newest complete step, its folder and manifest, and why newer folders were passed over."""
    passed_over: list[str] = []
    for step in _candidate_steps(directory):
        folder, manifest, problems = _find(directory, step)
        if folder is not None:
            return step, folder, manifest, passed_over
        passed_over += [f'step {step} ({directory / str(step)}): {why}' for _, why in problems]
    return None, None, None, passed_over


def _complete_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Every complete step under ``directory``, in increasing order."""
    directory = pathlib.Path(directory).absolute()
    steps = _candidate_steps(directory)
    return sorted(s for s in steps if _find(directory, s)[0] is not None)


def _indented_list(lines: list[str], limit: int = 20) -> str:
    """The first ``limit`` lines, each on its own indented line, then how many more."""
    shown = ''.join(f'\n  {line}' for line in lines[:limit])
    more = f'\n  ... and {len(lines) - limit} more' if len(lines) > limit else ''
    return shown + more


def _steps_note(directory: pathlib.Path) -> str:
    steps = _complete_steps(directory)
    if not steps:
        return 'There is no complete step in this directory.'
    shown = ', '.join(map(str, steps[-10:]))
    return f'Complete steps: {"..., " if len(steps) > 10 else ""}{shown}.'


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The largest step saved completely under ``directory``, or None when there is none.

    A step counts when its save finished: its manifest exists and lists files that
    are all present with their recorded sizes (checked without reading array
    data). Folders of saves that were killed part-way, and leftover temporary
    folders, are ignored; if a save was killed in the middle of overwriting a step,
    the old copy of that step still counts.

    Args:
      directory: the folder given to :func:`save_checkpoint`.

    Returns:
      The step number, or None.

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax, lion_optax.checkpoint
      >>> folder = tempfile.mkdtemp()
      >>> print(lion_optax.checkpoint.latest_step(folder))
      None
      >>> _ = lion_optax.checkpoint.save_checkpoint(folder, 3, {'w': jnp.zeros(2)})
      >>> _ = lion_optax.checkpoint.save_checkpoint(folder, 7, {'w': jnp.ones(2)})
      >>> lion_optax.checkpoint.latest_step(folder)
      7
      >>> import os; os.remove(os.path.join(folder, '7', 'lion_optax_manifest.json'))
      >>> lion_optax.checkpoint.latest_step(folder)  # 7 is no longer complete
      3
    """
    return _newest(pathlib.Path(directory).absolute())[0]


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------


def _remove_tree(path: pathlib.Path) -> None:
    """Deletes a folder (or file) and everything in it; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # Something could not be deleted: raise the error this time.
            shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _rename(source: pathlib.Path, target: pathlib.Path) -> None:
    """Renames atomically (both paths are in one folder) and makes the rename durable."""
    os.rename(source, target)
    _fsync_dir(target.parent)


def _clean_leftovers(directory: pathlib.Path) -> None:
    """Removes what killed saves left behind, first putting back an old copy that a save
    killed between its two renames left as the only complete copy of its step."""
    for entry in sorted(directory.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if not match:
            continue
        step = int(match.group(1))
        home = directory / str(step)
        if (
            entry.name == f'{step}{_REPLACED}'
            and _inspect(entry, step)[0] == 'complete'
            and not (home.is_dir() and _inspect(home, step)[0] == 'complete')
        ):
            _remove_tree(home)
            _rename(entry, home)
        else:
            _remove_tree(entry)


def _sync(what: str) -> None:
    """A barrier across all processes of a multi-host job (nothing with one process)."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

        ocp.multihost.sync_global_processes(f'lion_optax:{what}:{next(_barrier_ids)}')


def _storable(path: str, leaf: Any) -> None:
    """Refuses, before anything is written, a leaf orbax's TensorStore cannot write."""
    import tensorstore  # pylint: disable=g-import-not-at-top

    try:
        tensorstore.dtype(np.dtype(leaf.dtype).name)
    except (TypeError, ValueError):
        raise TypeError(
            f'Leaf {path or "<root>"} has dtype {leaf.dtype}, which orbax (TensorStore) '
            'cannot store, so nothing was saved. Convert the leaf to a supported dtype '
            'before saving (for example uint4 to uint8 with .astype) and back after '
            'restoring.'
        ) from None


def _existing(directory: pathlib.Path, step: int) -> str | None:
    """What already holds ``step``, for the FileExistsError message, or None."""
    target = directory / str(step)
    if target.is_dir():
        status, why = _inspect(target, step)
        if status == 'complete':
            return 'A checkpoint'
        return f'A folder that is not a complete checkpoint ({why})'
    if target.exists() or target.is_symlink():
        return 'A file'
    if _find(directory, step)[0] is not None:
        return 'A checkpoint (the old copy kept by an interrupted overwrite)'
    return None


def _commit(staging: pathlib.Path, target: pathlib.Path, step: int) -> None:
    """Checksums the finished copy in ``staging`` and switches it in as ``target``.

    At every instant a complete copy of the step's newest saved state exists: the
    old copy stays at ``target`` until the new one is complete and checked, then
    moves aside to ``<step>.lion_optax-replaced`` (which readers use while ``target``
    is missing) and is deleted only once the new copy is renamed to ``target``.
    """
    _write_manifest(staging, step)
    status, why = _inspect(staging, step)
    if status != 'complete':
        raise OSError(
            f'The new copy of step {step} at {staging} failed its check after writing '
            f'({why}); the previous checkpoints are untouched. Check the disk (space, '
            'errors) and save again.'
        )
    if not (target.exists() or target.is_symlink()):
        _rename(staging, target)
        return
    aside = target.with_name(f'{step}{_REPLACED}')
    _rename(target, aside)
    _rename(staging, target)
    try:
        _remove_tree(aside)
    except OSError:
        pass  # The new copy is in place; the next save removes the old one.


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: Any,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves a pytree of arrays (e.g. params and optimizer state) at ``step``.

    The write is synchronous and cannot lose data: the new copy is written beside
    the existing ones (``directory/<step>.lion_optax-saving``), its files are
    flushed to disk and checksummed into a manifest, it is checked complete, and
    only then is it renamed to ``directory/<step>``. Overwriting a step renames the
    old copy aside first and deletes it only once the new copy is in place. If the
    process dies at any moment, the newest previously saved state stays complete on
    disk and :func:`latest_step` / :func:`restore_checkpoint` return it (or the new
    one, if the save got as far as its rename); the next save removes the leftover
    temporary folders. A save that fails with an exception leaves nothing of itself
    behind.

    Args:
      directory: folder holding one sub-folder per step.
      step: the training step, an int >= 0, used as the sub-folder name.
      state: a pytree whose leaves are arrays or scalars, for example
        ``{'params': params, 'opt_state': opt_state, 'step': step}``. PRNG key
        arrays are stored as their key data and restored as keys. Leaves with no
        elements (a zero in their shape) are recorded by shape and dtype only.
      overwrite: replace an existing checkpoint for ``step`` instead of raising.

    Returns:
      The folder written, ``directory/<step>``.

    Raises:
      ValueError: ``step`` is not an int >= 0.
      TypeError: a leaf is not an array or a scalar, has a dtype orbax cannot
        store (e.g. uint4), or is a 64-bit NumPy array that JAX would narrow
        (jax_enable_x64 off). Nothing is written.
      FileExistsError: ``step`` exists and ``overwrite`` is False. Nothing is
        written.
      OSError: writing failed (for example the disk is full). The partial copy is
        removed; the earlier checkpoints, including an old copy of ``step``, are
        untouched.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, lion_optax, lion_optax.checkpoint
      >>> params = {'w': jnp.ones(3)}
      >>> opt_state = lion_optax.lion(1e-3).init(params)
      >>> folder = tempfile.mkdtemp()
      >>> lion_optax.checkpoint.save_checkpoint(folder, 5, {'params': params, 'opt_state': opt_state}).name
      '5'
      >>> _ = lion_optax.checkpoint.save_checkpoint(folder, 5, {'params': params, 'opt_state': opt_state},
      ...                                overwrite=True)
      >>> os.listdir(folder)  # the old copy of step 5 is gone, and nothing temporary is left
      ['5']
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    step = _check_step(step)
    paths, leaves, _ = _flatten(state)
    arrays, shapes, dtypes, key_impls = {}, [], [], {}
    for i, (path, leaf) in enumerate(zip(paths, leaves)):
        if isinstance(leaf, (str, bytes)) or not (
            hasattr(leaf, 'dtype') or isinstance(leaf, (int, float, complex, np.generic))
        ):
            raise TypeError(
                f'Leaf {path or "<root>"} is a {type(leaf).__name__}; a checkpoint holds '
                'arrays and numbers only. Keep other objects (configs, strings) out of '
                'the saved tree, or store them separately.'
            )
        if isinstance(leaf, (np.ndarray, np.generic)):
            narrowed = jax.dtypes.canonicalize_dtype(leaf.dtype)
            if narrowed != leaf.dtype:
                raise TypeError(
                    f'Leaf {path or "<root>"} is a NumPy {leaf.dtype} array, which JAX '
                    f'would narrow to {narrowed} because jax_enable_x64 is off: its '
                    'values could change and the saved dtype would not match it, so '
                    f'nothing was saved. Cast it yourself (.astype(np.{narrowed})) or '
                    'enable jax_enable_x64 before saving.'
                )
        leaf = jax.numpy.asarray(leaf)
        shape, dtype = _leaf_spec(leaf)
        shapes.append(shape)
        dtypes.append(dtype)
        if _is_key(leaf):
            key_impls[str(i)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        if math.prod(leaf.shape) == 0:
            continue  # Orbax cannot write zero-size arrays; the spec says all there is.
        _storable(path, leaf)
        arrays[f'leaf_{i:05d}'] = leaf
    spec = {
        'format_version': FORMAT_VERSION,
        'step': step,
        'paths': paths,
        'shapes': shapes,
        'dtypes': dtypes,
        'key_impls': key_impls,
    }
    directory = pathlib.Path(directory).absolute()
    target = directory / str(step)
    existing = None if overwrite else _existing(directory, step)
    if existing:
        raise FileExistsError(
            f'{existing} for step {step} already exists at {target}. Nothing was saved. '
            'Pass overwrite=True to replace it, or save under another step.'
        )
    primary = jax.process_index() == 0
    if primary:
        directory.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(directory)
    _sync('cleaned')
    staging = directory / f'{step}{_SAVING}'
    try:
        items = {_SPEC: ocp.args.JsonSave(spec)}
        if arrays:
            items[_ARRAYS] = ocp.args.StandardSave(arrays)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(staging, ocp.args.Composite(**items))
        if primary:
            _commit(staging, target, step)
    except BaseException:
        if primary:
            for leftover in directory.glob(f'{step}{_SAVING}*'):
                _remove_tree(leftover)
        raise
    _sync('committed')
    return target


# ---------------------------------------------------------------------------
# Restoring.
# ---------------------------------------------------------------------------


def _mismatches(spec: dict[str, Any], paths: list[str], leaves: list[Any]) -> list[str]:
    """Human-readable differences between a saved spec and a target's leaves."""
    saved = {p: (tuple(s), d) for p, s, d in zip(spec['paths'], spec['shapes'], spec['dtypes'])}
    wanted = {p: _leaf_spec(leaf) for p, leaf in zip(paths, leaves)}

    def show(shape_dtype):
        shape, dtype = shape_dtype
        return f'{dtype}[{",".join(map(str, shape))}]'

    problems = [f'{p}: in the checkpoint only, {show(saved[p])}' for p in saved if p not in wanted]
    problems += [f'{p}: in the target only, {show(wanted[p])}' for p in wanted if p not in saved]
    problems += [
        f'{p}: checkpoint has {show(saved[p])}, target expects {show(wanted[p])}'
        for p in wanted
        if p in saved and saved[p] != wanted[p]
    ]
    if not problems and list(saved) != list(wanted):
        problems.append('the same leaves appear in a different order (a different tree type)')
    return problems


def _describe_file(name: str) -> str:
    if name.startswith(_SPEC + '/'):
        return 'the description of the tree: paths, shapes and dtypes'
    if name.startswith(_ARRAYS + '/'):
        if '/d/' in f'/{name}':
            return 'array data, shared by the leaves in this file (orbax OCDBT)'
        return 'orbax metadata of the arrays'
    return 'orbax metadata of the checkpoint'


def _verify(folder: pathlib.Path, step: int, manifest: dict[str, Any], names: list[str]) -> None:
    """Recomputes the SHA-256 of ``names`` and raises if any differs from the manifest."""
    expected = manifest['files']
    try:
        actual = _hash_files(folder, names)
    except OSError as error:
        raise CheckpointCorruptError(
            f'The checkpoint for step {step} at {folder} cannot be read: {error}. '
            f'Nothing was restored. {_steps_note(folder.parent)}'
        ) from error
    bad = [
        f'{name} ({_describe_file(name)}): SHA-256 {sha[:16]}..., {size} bytes; its save '
        f'recorded {expected[name][1][:16]}..., {expected[name][0]} bytes'
        for name, (size, sha) in actual.items()
        if (size, sha) != expected[name]
    ]
    if bad:
        raise CheckpointCorruptError(
            f'The checkpoint for step {step} at {folder} is corrupt ({len(bad)} file(s) '
            f'differ from its manifest):{_indented_list(bad)}\n'
            'Nothing was restored. The files changed after the save completed (a disk '
            'or copy error, or an edit), so their numbers cannot be trusted. Restore '
            f'another step with restore_checkpoint(..., step=N). {_steps_note(folder.parent)}'
        )


def restore_checkpoint(
    directory: str | os.PathLike[str],
    target: Any,
    *,
    step: int | None = None,
) -> tuple[Any, int]:
    """Restores a checkpoint into the structure of ``target``, exactly as saved.

    ``target`` describes what the caller expects: the same pytree built fresh (for
    example ``{'params': params, 'opt_state': tx.init(params), 'step': 0}``) or its
    ``jax.eval_shape``. Every leaf's path, shape and dtype must equal the saved
    one; nothing is cast or reshaped. Restored arrays take the target leaves'
    shardings when they have one.

    Only complete steps are restored (see :func:`latest_step`), and every file of
    the step is checked against the SHA-256 recorded by its save before anything
    is read from it, so the result is bit for bit what was saved, or an error.
    Leftover folders of saves killed part-way are ignored.

    Args:
      directory: the folder given to :func:`save_checkpoint`.
      target: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the expected
        structure.
      step: which step to restore; None restores the newest complete step
        (:func:`latest_step`), warning about any newer step folder that is not
        complete.

    Returns:
      ``(state, step)``: the restored pytree, with ``target``'s structure, and
      its step.

    Raises:
      FileNotFoundError: there is no complete checkpoint (for ``step``) in
        ``directory``; for a step folder whose save did not finish, the message
        says so and lists the complete steps.
      CheckpointCorruptError: a file of the step differs from the checksum or
        size its save recorded, or is missing; the message names each file.
      CheckpointMismatchError: the tree, a shape or a dtype differs; the message
        lists every difference. Also for a step written in another checkpoint
        format (another version of lion_optax).

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax, lion_optax.checkpoint
      >>> params = {'w': jnp.ones(3)}
      >>> tx = lion_optax.lion(1e-3)
      >>> state = {'params': params, 'opt_state': tx.init(params)}
      >>> folder = tempfile.mkdtemp()
      >>> _ = lion_optax.checkpoint.save_checkpoint(folder, 10, state)
      >>> restored, step = lion_optax.checkpoint.restore_checkpoint(folder, state)
      >>> step, restored['params']['w'].tolist()
      (10, [1.0, 1.0, 1.0])
      >>> bf16 = lion_optax.lion(1e-3, mu_dtype=jnp.bfloat16)
      >>> try:
      ...     lion_optax.checkpoint.restore_checkpoint(
      ...         folder, {'params': params, 'opt_state': bf16.init(params)})
      ... except lion_optax.checkpoint.CheckpointMismatchError as error:
      ...     print(str(error).splitlines()[1])  # doctest: +ELLIPSIS
        ['opt_state']...mu['w']: checkpoint has float32[3], target expects bfloat16[3]
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    directory = pathlib.Path(directory).absolute()
    if step is None:
        step, source, manifest, passed_over = _newest(directory)
        passed = '\n  '.join(passed_over)
        if step is None:
            raise FileNotFoundError(
                f'No checkpoint under {directory}: expected complete sub-folders named '
                'by step, written by lion_optax.checkpoint.save_checkpoint.'
                + (f' These are not complete:\n  {passed}' if passed_over else '')
            )
        if passed_over:
            warnings.warn(
                'restore_checkpoint(step=None) passed over newer step folders that are '
                f'not complete checkpoints:\n  {passed}\nIt restores step {step}, the '
                'newest complete one. Delete or repair those folders to silence this '
                'warning.',
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        step = _check_step(step)
        problems: list[tuple[str, str]] | list[str]  # _find's (status, why), then text
        source, manifest, problems = _find(directory, step)
        if source is None:
            if not problems:
                raise FileNotFoundError(
                    f'No lion_optax checkpoint for step {step} at {directory / str(step)}. '
                    f'{_steps_note(directory)}'
                )
            status, why = problems[0]
            error = {
                'incomplete': FileNotFoundError,
                'damaged': CheckpointCorruptError,
                'in another format': CheckpointMismatchError,
            }[status]
            raise error(
                f'The checkpoint for step {step} at {directory / str(step)} is {status}: '
                f'{why}. Nothing was restored. Restore a complete step with step=N, or '
                f'step=None for the newest one. {_steps_note(directory)}'
            )
    assert source is not None  # _newest and _find return a folder with every step
    _verify(source, step, manifest, sorted(manifest['files']))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        spec = checkpointer.restore(source, ocp.args.Composite(**{_SPEC: ocp.args.JsonRestore()}))[
            _SPEC
        ]
        if spec.get('format_version') != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f'{source} has checkpoint format {spec.get("format_version")!r}; this '
                f'version of lion_optax reads format {FORMAT_VERSION}.'
            )
        paths, leaves, treedef = _flatten(target)
        problems = _mismatches(spec, paths, leaves)
        if problems:
            raise CheckpointMismatchError(
                f'The checkpoint at {source} does not match the restore target '
                f'({len(problems)} difference(s)):{_indented_list(problems)}\n'
                'Nothing was restored. Build the target with the same model and '
                'optimizer configuration that wrote the checkpoint (same optimizer, '
                'mu_dtype, mask and wrappers), e.g. {"params": params, "opt_state": '
                'tx.init(params)}. To change a dtype on purpose, restore with the '
                'original configuration, then convert the arrays explicitly.'
            )
        abstract, empty = {}, {}
        for i, leaf in enumerate(map(_as_abstract, leaves)):
            stored = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
            stored = jax.ShapeDtypeStruct(
                stored.shape, stored.dtype, sharding=getattr(leaf, 'sharding', None)
            )
            if math.prod(stored.shape) == 0:
                empty[i] = stored
            else:
                abstract[f'leaf_{i:05d}'] = stored
        arrays = {}
        if abstract:
            arrays = checkpointer.restore(
                source, ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(abstract)})
            )[_ARRAYS]
    restored = [
        _empty_array(empty[i]) if i in empty else arrays[f'leaf_{i:05d}']
        for i in range(len(leaves))
    ]
    for i, impl in spec['key_impls'].items():
        restored[int(i)] = jax.random.wrap_key_data(restored[int(i)], impl=impl)
    return jax.tree_util.tree_unflatten(treedef, restored), int(spec['step'])


def _empty_array(abstract: jax.ShapeDtypeStruct) -> jax.Array:
    """A zero-size array of the given shape and dtype, on the given sharding if any."""
    if abstract.sharding is None:
        return jax.numpy.zeros(abstract.shape, abstract.dtype)
    return jax.make_array_from_callback(
        abstract.shape,
        abstract.sharding,
        lambda index: np.zeros(abstract.shape, abstract.dtype)[index],
    )
