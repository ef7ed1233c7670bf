"""Checks of options, run when a transformation is built (or a step is traced).

(The checks of values only known when a step runs, schedules and injected
hyperparameters, are the guard's: :mod:`lion_optax._src.guard`.)

Every check raises an error that says what was wrong, what was expected and how
to fix it, so that a bad option fails at construction instead of at the first
``update`` (or, worse, never).
"""

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float when it is a concrete scalar, else None.

    Traced values (under ``jit``) and arrays that are not scalars return None:
    they cannot be checked when the transformation is built.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # pylint: disable=broad-except
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array)


def _check_scalar(name: str, value: Any) -> None:
    """Refuses an array (traced or not) that is not a scalar."""
    if not callable(value) and hasattr(value, 'shape') and np.shape(value) != ():
        raise ValueError(
            f'{name} must be a scalar (a Python number or a 0-d array), got {value!r} of '
            f'shape {np.shape(value)}. Pass a single value, e.g. 0.9.'
        )


def check_probability(name: str, value: Any, *, hint: str = '') -> None:
    """Refuses a concrete ``value`` outside ``[0, 1]`` or NaN (e.g. ``b1``, ``b2``).

    Arrays must be scalars; traced scalars are checked in the step instead.
    """
    if isinstance(value, bool) or not (
        isinstance(value, (int, float, np.number)) or hasattr(value, 'dtype')
    ):
        raise TypeError(f'{name} must be a number in [0, 1], got {value!r}.')
    _check_scalar(name, value)
    number = concrete_float(value)
    if number is None:
        return
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ValueError(
            f'{name}={value!r} is outside the valid range [0, 1]. {name} is an '
            'interpolation/decay rate; pass a float such as 0.9 or 0.99.'
            + (f' {hint}' if hint else '')
        )


def check_nonnegative(name: str, value: Any, *, hint: str = '') -> None:
    """Refuses a concrete ``value`` that is negative, NaN or infinite.

    Callables (schedules) are accepted: they are evaluated per step.
    """
    if callable(value):
        return
    if isinstance(value, (str, bytes, bool)) or not (
        isinstance(value, (int, float, np.number)) or hasattr(value, 'dtype')
    ):
        raise TypeError(
            f'{name} must be a number >= 0 or a schedule (a callable of the step count), '
            f'got {value!r} of type {type(value).__name__}.'
        )
    number = concrete_float(value)
    if number is None:
        if np.ndim(value) != 0:
            raise ValueError(
                f'{name} must be a scalar or a schedule (a callable of the step '
                f'count), got an array of shape {np.shape(value)}.'
            )
        return
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(
            f'{name}={value!r} is invalid: expected a finite number >= 0 or a '
            'schedule. A negative value would reverse the step (ascent instead '
            'of descent).' + (f' {hint}' if hint else '')
        )


def check_positive(name: str, value: Any, *, hint: str = '') -> None:
    """Refuses a concrete ``value`` that is not a finite number > 0."""
    check_nonnegative(name, value, hint=hint)
    number = concrete_float(value)
    if number is not None and number == 0.0:
        raise ValueError(
            f'{name}={value!r} is invalid: expected a finite number > 0.'
            + (f' {hint}' if hint else '')
        )


# Short names of float dtypes that configs and other libraries use (PyTorch-style
# 'bf16', 'fp16', 'fp32'; XLA's 'f16', 'f32'), which jnp.dtype does not know.
FLOAT_DTYPE_ALIASES = {
    'bf16': 'bfloat16',
    'fp16': 'float16',
    'f16': 'float16',
    'fp32': 'float32',
    'f32': 'float32',
}

# What an option checked by check_float_dtype accepts besides float dtypes, for its
# message: mu_dtype is first resolved as int8 storage (momentum_storage.resolve_int8).
_OTHER_FORMS = {
    'mu_dtype': (
        "'int8' or lion_optax.Int8Momentum(block_size=32, min_quantized_size=4096) "
        '(block-wise int8 storage)'
    ),
}


def _accepted_dtypes(name: str, allow_none: bool) -> str:
    """Every form ``name`` accepts, for error messages."""
    forms = []
    if allow_none:
        forms.append('None (follow the parameters)')
    forms.append(
        'a floating-point dtype (jnp.float32, jnp.bfloat16, jnp.float16, or their NumPy '
        "dtypes), its name ('float32', 'bfloat16', 'float16') or a short name ("
        + ', '.join(repr(alias) for alias in FLOAT_DTYPE_ALIASES)
        + ')'
    )
    if name in _OTHER_FORMS:
        forms.append(_OTHER_FORMS[name])
    return '; '.join(forms)


def check_float_dtype(name: str, dtype: Any, *, allow_none: bool = True) -> Any:
    """Returns ``dtype`` canonicalised, refusing anything that is not a float type.

    Short names (``'bf16'``, ``'fp16'``, ``'f16'``, ``'fp32'``, ``'f32'``) are read
    as the dtypes they name. The errors list every form ``name`` accepts.
    """
    if isinstance(dtype, (jax.Array, np.ndarray)) and dtype.shape == ():
        # optax.inject_hyperparams calls every callable hyperparameter with the
        # step count, which turns jnp.bfloat16 into a bf16 scalar: take its dtype.
        dtype = dtype.dtype
    if dtype is None:
        if allow_none:
            return None
        raise TypeError(
            f'{name} must be a floating-point dtype, got None. Accepted: '
            f'{_accepted_dtypes(name, allow_none)}.'
        )
    given = dtype
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPE_ALIASES.get(dtype, dtype)
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as error:
        raise TypeError(
            f'{name}={given!r} is not a dtype. Accepted: {_accepted_dtypes(name, allow_none)}.'
        ) from error
    if not jnp.issubdtype(canonical, jnp.floating):
        int8_hint = (
            " (the dtype int8 itself would round every momentum value below 1 to 0; "
            "for int8 storage pass the string 'int8')"
            if name in _OTHER_FORMS and canonical == np.int8
            else ''
        )
        raise TypeError(
            f'{name}={given!r} is not a floating-point dtype{int8_hint}. Lion keeps a '
            'momentum (an average of gradients), which needs a float type. Accepted: '
            f'{_accepted_dtypes(name, allow_none)}.'
        )
    return jax.dtypes.canonicalize_dtype(canonical)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Refuses ``value`` that is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f'{name}={value!r} is not a known option. Expected one of '
            f'{", ".join(repr(c) for c in choices)}.'
        )


def check_bool(name: str, value: Any) -> None:
    """Refuses a ``value`` that is not exactly True or False (e.g. a string or 0/1)."""
    if not isinstance(value, bool):
        raise TypeError(f'{name} must be True or False, got {value!r}.')


def check_float_params(params: Any, *, who: str) -> None:
    """Refuses integer, boolean and complex leaves at ``init`` time.

    Args:
        params: the parameter pytree given to ``init``.
        who: the transformation's name, for the message.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f'{who}: parameter {jax.tree_util.keystr(path)} is complex '
                f"({dtype}). Lion's sign update is not defined for complex numbers; "
                'split the parameter into real and imaginary float parts '
                '(e.g. store jnp.stack([z.real, z.imag])) and optimise those.'
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f'{who}: parameter {jax.tree_util.keystr(path)} has dtype {dtype}, '
                'which cannot take a gradient step. Give Lion floating-point '
                'parameters only; keep integer buffers (counters, indices) out of '
                'the optimised tree, e.g. with optax.masked or '
                'optax.partition.'
            )


def float_gradients(updates: Any, *, who: str) -> Any:
    """Gradients as float arrays: Python floats converted, integer and complex refused.

    Runs at trace time (dtypes are static). An integer gradient would be
    silently rounded into the float step (``jax.grad`` never returns one; a
    hand-made gradient of ints is a bug), so it is refused with the leaf named.
    """

    def one(path, leaf):
        if isinstance(leaf, (bool, np.bool_)) or (
            isinstance(leaf, (int, np.integer)) and not isinstance(leaf, bool)
        ):
            dtype = np.dtype(type(leaf)) if not isinstance(leaf, int) else np.dtype('int64')
        elif isinstance(leaf, (float, np.floating)):
            return jnp.asarray(leaf)
        else:
            dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f'{who}: gradient leaf {jax.tree_util.keystr(path)} has dtype {dtype}; '
                'gradients must be floating point (jax.grad of float parameters gives '
                'them). Cast it, e.g. grads = jax.tree.map(lambda g: g.astype(jnp.float32), '
                'grads), or compute it from float parameters.'
            )
        return leaf

    return jax.tree_util.tree_map_with_path(one, updates)


class _AnyLeaf:
    """Stands for a parameter in structure messages (JAX's would print whole arrays)."""

    def __repr__(self) -> str:
        return '*'


def _structure_text(tree: Any, limit: int = 400) -> str:
    text = str(jax.tree.structure(tree))
    return text if len(text) <= limit else f'{text[:limit]}... ({len(text)} characters)'


def check_mask(mask: Any, *, who: str, params: Any = None) -> None:
    """Refuses a mask whose leaves are not booleans, naming the leaf; with ``params``,
    also one whose structure is neither the params' nor a prefix of it.

    Args:
        mask: the mask pytree (a callable's result, once called).
        who: the transformation's name, for the message.
        params: the tree the mask is applied to (``optax.masked`` passes the params
            to ``init`` and the updates to ``update``), or None to check the leaves only.
    """
    fix = (
        'Pass a pytree of booleans with the structure of the params, a prefix of it '
        "(one boolean for a whole sub-tree, e.g. {'encoder': True, 'head': False}), or a "
        'callable params -> mask, e.g. lambda params: jax.tree.map(lambda p: p.ndim > 1, '
        'params).'
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        dtype = getattr(leaf, 'dtype', None)
        is_bool = isinstance(leaf, (bool, np.bool_)) or (
            dtype is not None and np.dtype(dtype) == np.bool_ and np.ndim(leaf) == 0
        )
        if not is_bool:
            where = f'mask leaf {jax.tree_util.keystr(path)}' if path else 'mask'
            raise TypeError(
                f'{who}: {where} is {leaf!r} (a {type(leaf).__name__}); a mask holds True '
                '(decay this leaf) or False (do not). ' + fix
            )
    if params is None:
        return
    placeholders = jax.tree.map(lambda _: _AnyLeaf(), params)
    try:
        jax.tree.structure(mask).flatten_up_to(placeholders)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{who}: mask does not fit the params: its tree structure is neither the params' "
            f'structure nor a prefix of it; {_mask_difference(mask, placeholders, error)}.\n'
            f'  mask:   {_structure_text(mask)}\n'
            f'  params: {_structure_text(params)}\n' + fix
        ) from None


def _mask_difference(mask: Any, params: Any, error: Exception) -> str:
    """Where a mask and the params differ, by path, for :func:`check_mask`'s message."""
    mask_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(mask)[0]]
    param_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def covers(prefix: tuple[Any, ...], path: tuple[Any, ...]) -> bool:
        return path[: len(prefix)] == prefix

    def listed(paths: list[Any]) -> str:
        shown = ', '.join(jax.tree_util.keystr(path) or '<root>' for path in paths[:5])
        return shown + (f' and {len(paths) - 5} more' if len(paths) > 5 else '')

    extra = [m for m in mask_paths if not any(covers(m, p) for p in param_paths)]
    uncovered = [p for p in param_paths if not any(covers(m, p) for m in mask_paths)]
    parts = []
    if extra:
        parts.append(f'the mask has {listed(extra)}, which the params lack')
    if uncovered:
        parts.append(f'the params have {listed(uncovered)}, which the mask does not cover')
    if not parts:  # the same paths in other containers (a list for a tuple, say)
        parts.append(f"the containers differ ({str(error).splitlines()[0].rstrip('.')})")
    return '; '.join(parts)


def check_matching_trees(
    what: str,
    updates: Any,
    reference: Any,
    reference_name: str,
    *,
    who: str,
) -> None:
    """Refuses ``updates`` whose tree structure or leaf shapes differ from ``reference``.

    Runs at trace time (shapes are static), so it costs nothing in the step.

    Args:
        what: the name of ``updates`` for the message (e.g. 'gradient').
        updates: a pytree of arrays.
        reference: a pytree of arrays with the expected structure and shapes.
        reference_name: the name of ``reference`` for the message.
        who: the transformation's name, for the message.
    """
    update_leaves, update_def = jax.tree_util.tree_flatten_with_path(updates)
    reference_leaves, reference_def = jax.tree_util.tree_flatten_with_path(reference)
    if update_def != reference_def:
        raise ValueError(
            f'{who}: the {what} tree does not match the {reference_name} tree.\n'
            f'  {what}: {update_def}\n  {reference_name}: {reference_def}\n'
            'Pass a gradient with exactly the structure of the parameters given '
            'to init (same containers, same keys).'
        )
    for (path, leaf), (_, expected) in zip(update_leaves, reference_leaves):
        if jnp.shape(leaf) != jnp.shape(expected):
            raise ValueError(
                f'{who}: {what} leaf {jax.tree_util.keystr(path)} has shape '
                f'{jnp.shape(leaf)} but the {reference_name} has shape '
                f'{jnp.shape(expected)}. Lion never broadcasts gradients (that '
                "would silently change the parameters' shape); pass a gradient "
                'of the same shape as the parameter.'
            )
