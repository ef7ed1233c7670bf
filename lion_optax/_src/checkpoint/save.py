"""Saving: refuse what cannot be stored, write a staging copy, switch it in by renames.

:func:`save_checkpoint` checks every leaf before anything is written, has orbax
write ``<step>.lion_optax-saving``, writes its manifest, checks the copy complete,
and only then renames it to ``<step>`` (an overwrite first renames the old copy to
``<step>.lion_optax-replaced`` and deletes it once the new one is in place). Every
rename is flushed, so at any instant the newest saved state is complete on disk.
Each save first removes what killed saves left behind. The renames, deletions and
the manifest are called through their modules (``files.rename``, ``manifest.write``)
so that the kill tests can wrap them in one place.
"""

import itertools
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np

from lion_optax._src.checkpoint import files, manifest, steps, tree
from lion_optax._src.pytree import PyTree

_barrier_ids = itertools.count()


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
        status, why = steps.inspect(target, step)
        if status == 'complete':
            return 'A checkpoint'
        return f'A folder that is not a complete checkpoint ({why})'
    if target.exists() or target.is_symlink():
        return 'A file'
    if steps.find(directory, step)[0] is not None:
        return 'A checkpoint (the old copy kept by an interrupted overwrite)'
    return None


def _clean_leftovers(directory: pathlib.Path) -> None:
    """Removes what killed saves left behind, first putting back an old copy that a save
    killed between its two renames left as the only complete copy of its step."""
    for entry in sorted(directory.iterdir()):
        match = steps.LEFTOVER.match(entry.name)
        if not match:
            continue
        step = int(match.group(1))
        home = directory / str(step)
        if (
            entry.name == f'{step}{steps.REPLACED}'
            and steps.inspect(entry, step)[0] == 'complete'
            and not (home.is_dir() and steps.inspect(home, step)[0] == 'complete')
        ):
            files.remove_tree(home)
            files.rename(entry, home)
        else:
            files.remove_tree(entry)


def _commit(staging: pathlib.Path, target: pathlib.Path, step: int) -> None:
    """Checksums the finished copy in ``staging`` and switches it in as ``target``.

    At every instant a complete copy of the step's newest saved state exists: the
    old copy stays at ``target`` until the new one is complete and checked, then
    moves aside to ``<step>.lion_optax-replaced`` (which readers use while ``target``
    is missing) and is deleted only once the new copy is renamed to ``target``.
    """
    manifest.write(staging, step)
    status, why = steps.inspect(staging, step)
    if status != 'complete':
        raise OSError(
            f'The new copy of step {step} at {staging} failed its check after writing '
            f'({why}); the previous checkpoints are untouched. Check the disk (space, '
            'errors) and save again.'
        )
    if not (target.exists() or target.is_symlink()):
        files.rename(staging, target)
        return
    aside = target.with_name(f'{step}{steps.REPLACED}')
    files.rename(target, aside)
    files.rename(staging, target)
    try:
        files.remove_tree(aside)
    except OSError:
        pass  # The new copy is in place; the next save removes the old one.


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: PyTree,
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

    step = steps.check_step(step)
    paths, leaves, _ = tree.flatten(state)
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
        shape, dtype = tree.leaf_spec(leaf)
        shapes.append(shape)
        dtypes.append(dtype)
        if tree.is_key(leaf):
            key_impls[str(i)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        if math.prod(leaf.shape) == 0:
            continue  # Orbax cannot write zero-size arrays; the spec says all there is.
        _storable(path, leaf)
        arrays[tree.array_name(i)] = leaf
    spec = {
        'format_version': manifest.FORMAT_VERSION,
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
    staging = directory / f'{step}{steps.SAVING}'
    try:
        items = {tree.SPEC: ocp.args.JsonSave(spec)}
        if arrays:
            items[tree.ARRAYS] = ocp.args.StandardSave(arrays)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(staging, ocp.args.Composite(**items))
        if primary:
            _commit(staging, target, step)
    except BaseException:
        if primary:
            for leftover in directory.glob(f'{step}{steps.SAVING}*'):
                files.remove_tree(leftover)
        raise
    _sync('committed')
    return target
