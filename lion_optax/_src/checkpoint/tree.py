"""How a pytree is stored: a description of its leaves, and one array per leaf.

A step folder holds two orbax items. ``lion_optax`` (:data:`SPEC`, JSON) describes
the tree: the format version, the step, and every leaf's path (``jax.tree_util.keystr``),
shape and dtype, with the implementation of each PRNG key leaf. ``arrays``
(:data:`ARRAYS`) holds every leaf with at least one element under
:func:`array_name` of its index, PRNG keys as their key data; it is absent when no
leaf has an element. A zero-size leaf has no array: its description is all there is.
"""

from typing import Any

import jax

from lion_optax._src.pytree import PyTree

SPEC = 'lion_optax'
ARRAYS = 'arrays'

# State fields renamed since checkpoints of this format were first written: the last
# key of a saved path (old name) -> the name the field has now. A checkpoint that
# holds the old name restores into a target built by this version.
RENAMED_FIELDS = {
    # lion_optax 0.2: SkipNonfiniteState.skipped_steps.
    'skipped_steps': 'nonfinite_gradient_steps',
}


def current_path(saved_path: str, target_paths: set[str]) -> str:
    """``saved_path`` with a renamed last field (:data:`RENAMED_FIELDS`) under its new
    name, where the target has the new name and not the old one; otherwise as is.

    Example:
      >>> current_path('[1].skipped_steps', {'[1].nonfinite_gradient_steps'})
      '[1].nonfinite_gradient_steps'
      >>> current_path('[1].skipped_steps', {'[1].skipped_steps'})
      '[1].skipped_steps'
    """
    for old, new in RENAMED_FIELDS.items():
        suffix = '.' + old
        if saved_path.endswith(suffix) and saved_path not in target_paths:
            renamed = saved_path[: -len(suffix)] + '.' + new
            if renamed in target_paths:
                return renamed
    return saved_path


def array_name(index: int) -> str:
    """The name of leaf ``index``'s array in the ``arrays`` item (save and restore agree)."""
    return f'leaf_{index:05d}'


def as_abstract(leaf: Any) -> Any:
    """An array or ``jax.ShapeDtypeStruct`` as is; a Python or NumPy scalar as an array."""
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
        return leaf
    return jax.numpy.asarray(leaf)


def leaf_spec(leaf: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of an array, ``jax.ShapeDtypeStruct`` or scalar."""
    leaf = as_abstract(leaf)
    return tuple(int(d) for d in leaf.shape), str(leaf.dtype)


def is_key(leaf: Any) -> bool:
    """Whether ``leaf`` is a typed PRNG key array (stored as its key data)."""
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)``, each path as ``jax.tree_util.keystr`` writes it."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves_with_paths]
    return paths, [leaf for _, leaf in leaves_with_paths], treedef
