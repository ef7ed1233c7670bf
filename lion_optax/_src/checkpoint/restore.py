"""Restoring: the step to read, its files checked, the target compared, then the arrays.

:func:`restore_checkpoint` takes the step asked for, or the newest complete one
(``steps.newest``), and refuses what it cannot restore exactly: a step that is not
complete (``FileNotFoundError``; :class:`CheckpointCorruptError` when damaged,
:class:`CheckpointMismatchError` when of another format), a file whose SHA-256 differs from the manifest (:class:`CheckpointCorruptError`,
naming each file; checked before anything is read from the step), and a target
whose tree, shapes or dtypes differ from the saved description
(:class:`CheckpointMismatchError`, naming each difference). Only then are the
arrays read, onto the target leaves' shardings.
"""

import math
import os
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from lion_optax._src.checkpoint import files, manifest, steps, tree
from lion_optax._src.pytree import PyTree


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


def _mismatches(spec: dict[str, Any], paths: list[str], leaves: list[Any]) -> list[str]:
    """Human-readable differences between a saved spec and a target's leaves."""
    wanted = {p: tree.leaf_spec(leaf) for p, leaf in zip(paths, leaves)}
    target_paths = set(wanted)
    saved = {
        tree.current_path(p, target_paths): (tuple(s), d)
        for p, s, d in zip(spec['paths'], spec['shapes'], spec['dtypes'])
    }

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
    """What a file of the step holds, for the message that names it as corrupt."""
    if name.startswith(tree.SPEC + '/'):
        return 'the description of the tree: paths, shapes and dtypes'
    if name.startswith(tree.ARRAYS + '/'):
        if '/d/' in f'/{name}':
            return 'array data, shared by the leaves in this file (orbax OCDBT)'
        return 'orbax metadata of the arrays'
    return 'orbax metadata of the checkpoint'


def _indented_list(lines: list[str], limit: int = 20) -> str:
    """The first ``limit`` lines, each on its own indented line, then how many more."""
    shown = ''.join(f'\n  {line}' for line in lines[:limit])
    more = f'\n  ... and {len(lines) - limit} more' if len(lines) > limit else ''
    return shown + more


def _verify(folder: pathlib.Path, step: int, recorded: dict[str, Any], names: list[str]) -> None:
    """Recomputes the SHA-256 of ``names`` and raises if any differs from the manifest
    ``recorded`` (as ``steps.find`` returns it)."""
    expected = recorded['files']
    try:
        actual = files.hash_files(folder, names)
    except OSError as error:
        raise CheckpointCorruptError(
            f'The checkpoint for step {step} at {folder} cannot be read: {error}. '
            f'Nothing was restored. {steps.complete_steps_note(folder.parent)}'
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
            'another step with restore_checkpoint(..., step=N). '
            f'{steps.complete_steps_note(folder.parent)}'
        )


def restore_checkpoint(
    directory: str | os.PathLike[str],
    target: PyTree,
    *,
    step: int | None = None,
) -> tuple[PyTree, int]:
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
        step, source, recorded, passed_over = steps.newest(directory)
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
        step = steps.check_step(step)
        problems: list[tuple[str, str]] | list[str]  # steps.find's (status, why), then text
        source, recorded, problems = steps.find(directory, step)
        if source is None:
            if not problems:
                raise FileNotFoundError(
                    f'No lion_optax checkpoint for step {step} at {directory / str(step)}. '
                    f'{steps.complete_steps_note(directory)}'
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
                f'step=None for the newest one. {steps.complete_steps_note(directory)}'
            )
    assert source is not None  # steps.newest and steps.find return a folder with every step
    _verify(source, step, recorded, sorted(recorded['files']))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        spec = checkpointer.restore(
            source, ocp.args.Composite(**{tree.SPEC: ocp.args.JsonRestore()})
        )[tree.SPEC]
        if spec.get('format_version') != manifest.FORMAT_VERSION:
            raise CheckpointMismatchError(
                f'{source} has checkpoint format {spec.get("format_version")!r}; this '
                f'version of lion_optax reads format {manifest.FORMAT_VERSION}.'
            )
        paths, leaves, treedef = tree.flatten(target)
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
        for i, leaf in enumerate(map(tree.as_abstract, leaves)):
            stored = jax.eval_shape(jax.random.key_data, leaf) if tree.is_key(leaf) else leaf
            stored = jax.ShapeDtypeStruct(
                stored.shape, stored.dtype, sharding=getattr(leaf, 'sharding', None)
            )
            if math.prod(stored.shape) == 0:
                empty[i] = stored
            else:
                abstract[tree.array_name(i)] = stored
        arrays = {}
        if abstract:
            arrays = checkpointer.restore(
                source, ocp.args.Composite(**{tree.ARRAYS: ocp.args.StandardRestore(abstract)})
            )[tree.ARRAYS]
    restored = [
        _empty_array(empty[i]) if i in empty else arrays[tree.array_name(i)]
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
