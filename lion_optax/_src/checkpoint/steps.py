"""Which steps a checkpoint directory holds complete, and which folder holds each.

A directory holds one folder per step, ``<step>``, and what saves leave beside them:
``<step>.lion_optax-saving`` (:data:`SAVING`, a save's staging copy, never read),
``<step>.lion_optax-replaced`` (:data:`REPLACED`, the old copy an overwrite moved
aside, read while ``<step>`` is missing) and orbax's temporary folders. A copy is
complete when its manifest parses and names the step, and every file it lists is
there with its recorded size; no array data is read. A copy that is not complete is
a status with its reason (:func:`inspect`), never an exception. :func:`newest` is the
fallback of ``restore_checkpoint(step=None)`` and of :func:`latest_step`.
"""

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from lion_optax._src.checkpoint import manifest, tree

SAVING = '.lion_optax-saving'
REPLACED = '.lion_optax-replaced'
# What killed saves leave beside the step folders: ours (staging copies, old copies being
# replaced, orbax's temporary folders of our staging copies) and orbax's own temporary
# folders from format 1 (``<step>.orbax-checkpoint-tmp...``).
LEFTOVER = re.compile(r'^(\d+)\.(lion_optax-|orbax-checkpoint-tmp)')


def check_step(step: Any) -> int:
    """``step`` as an int, or a ValueError when it is not an int >= 0."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f'step must be an int >= 0, got {step!r}.')
    return int(step)


def inspect(folder: pathlib.Path, step: int) -> tuple[str, Any]:
    """Whether ``folder`` holds a complete copy of ``step``, without reading array data.

    Returns ``('complete', manifest)`` or ``(status, reason)`` with status
    ``'incomplete'`` (no manifest: its save did not finish), ``'damaged'`` (a
    manifest, but it or the files it lists do not check out: unreadable, not what
    its save wrote, missing, or of another size) or ``'in another format'``
    (written by another version of lion_optax). Never raises for what is on disk.
    """
    path = folder / manifest.FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        try:
            old = json.loads((folder / tree.SPEC / 'metadata').read_text(encoding='utf-8'))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get('format_version') == 1:
            return 'in another format', (
                'it was written by an older lion_optax (checkpoint format 1, without '
                'manifest or checksums, whose saves could be left half-written), so its '
                'completeness and contents cannot be checked; this version reads format '
                f'{manifest.FORMAT_VERSION}. Restore it with the version that wrote it and '
                'save it again with this one'
            )
        return 'incomplete', (
            f'it has no {manifest.FILENAME}, which a save writes last: the save that '
            'created it was interrupted (killed) before it finished, or the folder was '
            'not written by lion_optax.checkpoint.save_checkpoint'
        )
    except OSError as error:
        return 'damaged', f'its manifest cannot be read ({error})'
    status, detail = manifest.parse(raw)
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


def _copies(directory: pathlib.Path, step: int) -> list[pathlib.Path]:
    """Where a complete copy of ``step`` may be: its folder, then the old copy an
    overwrite renamed aside (used only if a save was killed between its renames)."""
    return [directory / str(step), directory / f'{step}{REPLACED}']


def find(
    directory: pathlib.Path, step: int
) -> tuple[pathlib.Path | None, Any, list[tuple[str, str]]]:
    """``(folder, manifest, [])`` for a complete copy of ``step``, else ``(None, None, problems)``.

    ``problems`` holds ``(status, reason)`` for the step folder when there is one and
    it is not complete (see :func:`inspect`).
    """
    problems = []
    for candidate in _copies(directory, step):
        if not candidate.is_dir():
            continue
        status, detail = inspect(candidate, step)
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
        if name.endswith(REPLACED):
            name = name[: -len(REPLACED)]
        if name.isdigit() and name.isascii():
            steps.add(int(name))
    return sorted(steps, reverse=True)


def newest(directory: pathlib.Path) -> tuple[int | None, pathlib.Path | None, Any, list[str]]:
    """The newest complete step, its folder and manifest, and why newer folders were passed over."""
    passed_over: list[str] = []
    for step in _candidate_steps(directory):
        folder, recorded, problems = find(directory, step)
        if folder is not None:
            return step, folder, recorded, passed_over
        passed_over += [f'step {step} ({directory / str(step)}): {why}' for _, why in problems]
    return None, None, None, passed_over


def complete_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Every complete step under ``directory``, in increasing order."""
    directory = pathlib.Path(directory).absolute()
    steps = _candidate_steps(directory)
    return sorted(s for s in steps if find(directory, s)[0] is not None)


def complete_steps_note(directory: pathlib.Path) -> str:
    """The sentence error messages end with: which steps there are to restore instead."""
    steps = complete_steps(directory)
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
    return newest(pathlib.Path(directory).absolute())[0]
