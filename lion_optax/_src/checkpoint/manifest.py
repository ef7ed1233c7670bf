"""The manifest: every file of a step with its size and SHA-256, written last.

``lion_optax_manifest.json`` makes a step folder a checkpoint: a step counts only
once its manifest exists and checks out (see ``steps``), and a restore recomputes
the checksums it lists before using any file. It holds ``format_version``, ``step``,
``files`` (``{relative POSIX path: [size in bytes, SHA-256 hex]}`` for every file of
the step but the manifest) and ``sha256``, the digest of the rest in canonical JSON;
it is written as ``json.dumps(indent=1, sort_keys=True)``, and :func:`parse` refuses
any other bytes. :func:`parse` never raises: a damaged manifest makes its step
damaged, named in the error or warning, never a crash of the reader.
"""

import hashlib
import json
import os
import pathlib
import re
from typing import Any

from lion_optax._src.checkpoint import files

# The checkpoint format that this version writes and reads. The description of the tree
# (``tree.SPEC``) carries it too; format 1 had no manifest.
FORMAT_VERSION = 2
FILENAME = 'lion_optax_manifest.json'
_SHA256_HEX = re.compile(r'^[0-9a-f]{64}$')


def _files_of(folder: pathlib.Path) -> list[str]:
    """Every regular file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    names = []
    for root, _, found in os.walk(folder):
        for name in found:
            relative = (pathlib.Path(root) / name).relative_to(folder).as_posix()
            if relative != FILENAME and not relative.startswith(FILENAME + '.'):
                names.append(relative)
    return sorted(names)


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _text(manifest: dict[str, Any]) -> str:
    """The exact text :func:`write` writes for ``manifest``."""
    return json.dumps(manifest, indent=1, sort_keys=True)


def write(folder: pathlib.Path, step: int) -> None:
    """Hashes and flushes every file of ``folder``, then writes its manifest atomically."""
    hashes = files.hash_files(folder, _files_of(folder), flush=True)
    body = {
        'format_version': FORMAT_VERSION,
        'step': step,
        'files': {name: [size, sha] for name, (size, sha) in hashes.items()},
    }
    manifest = dict(body, sha256=_digest(body))
    partial = folder / (FILENAME + '.partial')
    with open(partial, 'w', encoding='utf-8') as f:
        f.write(_text(manifest))
        f.flush()
        files.fsync(f.fileno())
    os.replace(partial, folder / FILENAME)
    files.fsync_dir(folder)


def parse(raw: bytes) -> tuple[str, Any]:
    """``('complete', {'step', 'format_version', 'files': {name: (size, sha)}})`` or why not.

    Checks every byte: the text must be UTF-8, JSON, carry its own checksum, and be
    laid out exactly as :func:`write` lays it out (so a byte changed where JSON
    ignores it, e.g. in whitespace, is caught too); every field must have the type a
    save writes. Returns ``('damaged', reason)`` or ``('in another format', reason)``
    otherwise, never raises: a damaged manifest must make its step skipped or refused
    by name, not crash the reader.
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
    if manifest.get('sha256') != _digest(body):
        return 'damaged', 'its own checksum does not match'
    if _text(manifest).encode('utf-8') != raw:
        return 'damaged', 'its bytes are not laid out as its save wrote them'
    listed = body.get('files')
    if set(body) != {'format_version', 'step', 'files'} or not isinstance(listed, dict):
        return 'damaged', (
            f'it has the keys {sorted(manifest)}; a save writes files, format_version, '
            'sha256 and step, with files an object'
        )
    for key in ('format_version', 'step'):
        if not isinstance(body[key], int) or isinstance(body[key], bool):
            return 'damaged', f'its {key} is {body[key]!r}, not an int'
    checked = {}
    for name, entry in listed.items():
        parts = name.split('/')
        if name == FILENAME or not all(part not in ('', '.', '..') for part in parts):
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
