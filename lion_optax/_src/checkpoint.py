"""Checkpoints of training state (params + optimizer state) on top of orbax.

Orbax restores into whatever target it is given and casts silently: a bfloat16
momentum saved by ``lion(mu_dtype=jnp.bfloat16)`` comes back as float32 when the
target was built by ``lion()``, and the run continues with a different optimizer
than the one that was checkpointed. These helpers write, next to the arrays, the
path, shape and dtype of every leaf, and :func:`restore_checkpoint` refuses a target
that differs in any of them, naming each difference, before reading any array.

Leaves with no elements (a zero in their shape) have no bytes and orbax cannot
write them, so only their shape and dtype are recorded and restore rebuilds them.
A leaf with a dtype orbax cannot store (e.g. uint4) is refused before anything is
written.

Layout: ``directory/<step>/`` holds an orbax composite checkpoint with the items
``arrays`` (the leaves with at least one element, flattened; absent when there is
none) and ``lion_optax`` (a JSON description of the tree).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

import jax
import numpy as np

FORMAT_VERSION = 2
_ARRAYS = 'arrays'
_SPEC = 'lion_optax'


class CheckpointMismatchError(ValueError):
    """A checkpoint's tree, shapes or dtypes differ from the restore target."""


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


def _step_dir(directory: str | os.PathLike[str], step: int) -> pathlib.Path:
    return pathlib.Path(directory).absolute() / str(int(step))


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The largest step saved under ``directory``, or None when there is none.

    Args:
      directory: the folder given to :func:`save_checkpoint`.

    Returns:
      The step number, or None.

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax
      >>> folder = tempfile.mkdtemp()
      >>> print(lion_optax.latest_step(folder))
      None
      >>> _ = lion_optax.save_checkpoint(folder, 3, {'w': jnp.zeros(2)})
      >>> _ = lion_optax.save_checkpoint(folder, 7, {'w': jnp.ones(2)})
      >>> lion_optax.latest_step(folder)
      7
    """
    path = pathlib.Path(directory)
    if not path.is_dir():
        return None
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / _SPEC).is_dir()]
    return max(steps, default=None)


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


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: Any,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves a pytree of arrays (e.g. params and optimizer state) at ``step``.

    The write is synchronous and atomic (orbax writes to a temporary folder and
    renames it when complete), so a crash never leaves a half-written step that
    :func:`latest_step` would pick.

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
      TypeError: a leaf is not an array or a scalar, or has a dtype orbax cannot
        store (e.g. uint4). Nothing is written.
      FileExistsError: ``step`` exists and ``overwrite`` is False.

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax
      >>> params = {'w': jnp.ones(3)}
      >>> opt_state = lion_optax.lion(1e-3).init(params)
      >>> folder = tempfile.mkdtemp()
      >>> lion_optax.save_checkpoint(folder, 5, {'params': params, 'opt_state': opt_state}).name
      '5'
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f'step must be an int >= 0, got {step!r}.')
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
        'step': int(step),
        'paths': paths,
        'shapes': shapes,
        'dtypes': dtypes,
        'key_impls': key_impls,
    }
    target = _step_dir(directory, step)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f'A checkpoint for step {step} already exists at {target}. Pass '
            'overwrite=True to replace it, or save under another step.'
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    items = {_SPEC: ocp.args.JsonSave(spec)}
    if arrays:
        items[_ARRAYS] = ocp.args.StandardSave(arrays)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(target, ocp.args.Composite(**items), force=overwrite)
    return target


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

    Args:
      directory: the folder given to :func:`save_checkpoint`.
      target: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the expected
        structure.
      step: which step to restore; None restores :func:`latest_step`.

    Returns:
      ``(state, step)``: the restored pytree, with ``target``'s structure, and
      its step.

    Raises:
      FileNotFoundError: there is no checkpoint (for ``step``) in ``directory``.
      CheckpointMismatchError: the tree, a shape or a dtype differs; the message
        lists every difference.

    Example:
      >>> import tempfile, jax.numpy as jnp, lion_optax
      >>> params = {'w': jnp.ones(3)}
      >>> tx = lion_optax.lion(1e-3)
      >>> state = {'params': params, 'opt_state': tx.init(params)}
      >>> folder = tempfile.mkdtemp()
      >>> _ = lion_optax.save_checkpoint(folder, 10, state)
      >>> restored, step = lion_optax.restore_checkpoint(folder, state)
      >>> step, restored['params']['w'].tolist()
      (10, [1.0, 1.0, 1.0])
      >>> bf16 = lion_optax.lion(1e-3, mu_dtype=jnp.bfloat16)
      >>> try:
      ...     lion_optax.restore_checkpoint(
      ...         folder, {'params': params, 'opt_state': bf16.init(params)})
      ... except lion_optax.CheckpointMismatchError as error:
      ...     print(str(error).splitlines()[1])  # doctest: +ELLIPSIS
        ['opt_state']...mu['w']: checkpoint has float32[3], target expects bfloat16[3]
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if step is None:
        step = latest_step(directory)
        if step is None:
            raise FileNotFoundError(
                f'No checkpoint under {pathlib.Path(directory).absolute()}: expected '
                'sub-folders named by step, written by lion_optax.save_checkpoint.'
            )
    source = _step_dir(directory, step)
    if not (source / _SPEC).is_dir():
        raise FileNotFoundError(
            f'No lion_optax checkpoint for step {step} at {source}. Steps available: '
            f'{latest_step(directory)!r} is the latest (None: none).'
        )
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
            shown = '\n  '.join(problems[:20])
            more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
            raise CheckpointMismatchError(
                f'The checkpoint at {source} does not match the restore target '
                f'({len(problems)} difference(s)):\n  {shown}{more}\n'
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
