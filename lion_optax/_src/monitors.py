r"""Monitors for Lion's known failure modes: sign flips and sign agreement.

Lion's step has the same size in every coordinate, so two things tell whether
it is making progress or dithering:

- the **sign-flip fraction**, the share of coordinates whose update sign
  reversed since the previous step. A value near 0.5 means the update is
  close to random (noise-dominated gradients: batch too small, ``b1`` too
  small, or a learning rate so large that the weights oscillate across a
  minimum);
- the **sign agreement**, the share of coordinates where the direction
  :math:`\mathrm{sign}(c_t)` has the sign of the current gradient
  :math:`g_t`. It is 1 when momentum and gradient agree everywhere and about
  0.5 when the gradient is pure noise around the momentum; it is the kept
  fraction :math:`\mathrm{mean}(\phi_t)` of Cautious Lion.

Both are pure functions of trees (:func:`sign_flip_fraction`,
:func:`sign_agreement`), and :func:`monitor_signs` is an opt-in wrapper that
keeps the previous signs (one int8 per parameter) and the two statistics in
its state. Nothing here is part of the optimizer unless you add it.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import sharding, validation
from lion_optax._src.pytree import PyTree


def _fraction(count_leaf, a: PyTree, b: PyTree, *, per_leaf: bool, who: str) -> Any:
    """Applies ``count_leaf(x, y) -> int count`` per leaf; returns fractions."""
    validation.check_matching_trees('second tree', b, a, 'first tree', who=who)
    counts = jax.tree.map(count_leaf, a, b)
    if per_leaf:
        return jax.tree.map(lambda n, x: n.astype(jnp.float32) / max(jnp.size(x), 1), counts, a)
    total = optax.tree.size(a)
    if total == 0:
        return jnp.zeros([], jnp.float32)
    count = sum(n.astype(jnp.float32) for n in jax.tree.leaves(counts))
    return count / total


def _signs(x: jax.Array) -> jax.Array:
    """``sign(x)`` as int8 (exact whatever the magnitude: no products that underflow)."""
    return jnp.sign(x).astype(jnp.int8)


def sign_flip_fraction(previous: PyTree, current: PyTree, *, per_leaf: bool = False) -> Any:
    r"""The fraction of coordinates whose sign reversed between two updates.

    .. math::

        \text{flips} = \frac{1}{n}\sum_i \mathbb{1}\bigl[\mathrm{sign}(u^{\text{prev}}_i)
        \,\mathrm{sign}(u_i) < 0\bigr]

    over all :math:`n` coordinates of the tree. A zero on either side is not a
    flip (Cautious Lion zeroes coordinates; they count as no flip).

    Args:
        previous: the previous update (or direction, or its signs).
        current: the current one, with the same structure and shapes.
        per_leaf: return a tree of per-array fractions instead of one scalar.

    Returns:
        A float32 scalar in ``[0, 1]``, or a tree of them.

    Example:
        >>> import jax.numpy as jnp
        >>> import lion_optax
        >>> lion_optax.sign_flip_fraction(jnp.array([1.0, -1.0, 1.0, 0.0]),
        ...                               jnp.array([1.0, 1.0, -1.0, 1.0]))
        Array(0.5, dtype=float32)
    """
    return _fraction(
        lambda a, b: jnp.sum(_signs(a) * _signs(b) < 0),
        previous,
        current,
        per_leaf=per_leaf,
        who='sign_flip_fraction',
    )


def sign_agreement(direction: PyTree, grads: PyTree, *, per_leaf: bool = False) -> Any:
    r"""The fraction of coordinates where a direction has the gradient's sign.

    .. math::

        \text{agreement} = \frac{1}{n}\sum_i \mathbb{1}\bigl[\mathrm{sign}(c_i)
        \,\mathrm{sign}(g_i) > 0\bigr]

    Pass Lion's interpolation :math:`c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t`,
    or the direction returned by :func:`scale_by_lion` (same signs for every
    built-in kappa), and the gradient :math:`g_t`. Zeros count as disagreement,
    so this is exactly the kept fraction :math:`\mathrm{mean}(\phi_t)` of
    Cautious Lion.

    Args:
        direction: :math:`c_t` or the Lion direction (a descent direction: it is
            subtracted from the parameters).
        grads: the gradient, with the same structure and shapes.
        per_leaf: return a tree of per-array fractions instead of one scalar.

    Returns:
        A float32 scalar in ``[0, 1]``, or a tree of them.

    Example:
        >>> import jax.numpy as jnp
        >>> import lion_optax
        >>> lion_optax.sign_agreement({'w': jnp.array([1.0, -1.0, 1.0, 1.0])},
        ...                           {'w': jnp.array([2.0, -3.0, -1.0, 0.0])})
        Array(0.5, dtype=float32)
    """
    return _fraction(
        lambda a, b: jnp.sum(_signs(a) * _signs(b) > 0),
        direction,
        grads,
        per_leaf=per_leaf,
        who='sign_agreement',
    )


class SignMonitorState(NamedTuple):
    """State of :func:`monitor_signs`.

    Attributes:
        inner_state: the wrapped transformation's state.
        previous_sign: the sign of the previous update, int8, one per parameter.
        flip_fraction: :func:`sign_flip_fraction` of the last update against the
            one before it (0 after the first step), float32 scalar.
        agreement: :func:`sign_agreement` of the last update with its gradient,
            float32 scalar.
    """

    inner_state: Any
    previous_sign: PyTree
    flip_fraction: jax.Array
    agreement: jax.Array


def monitor_signs(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a direction (e.g. :func:`scale_by_lion`) and records sign statistics.

    After each update the state holds the fraction of coordinates whose sign
    flipped since the previous update and the agreement of the update's signs
    with the gradient's (see :func:`sign_flip_fraction` and
    :func:`sign_agreement`). The updates and the inner state are exactly those
    of ``inner``. Wrap the transformation whose output is a *descent direction*
    with the gradient's orientation, i.e. :func:`scale_by_lion` inside a chain
    (after the learning rate the update is negated and the agreement would read
    as its complement). Costs one int8 per parameter of state and one pass over
    the direction and gradient per step.

    Args:
        inner: the transformation to observe.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with state
        :class:`SignMonitorState`.

    Example:
        >>> import jax.numpy as jnp
        >>> import optax, lion_optax
        >>> opt = optax.chain(
        ...     lion_optax.monitor_signs(lion_optax.scale_by_lion()),
        ...     lion_optax.add_decoupled_weight_decay(0.1),
        ...     optax.scale_by_learning_rate(1e-3),
        ... )
        >>> params = {'w': jnp.ones(4)}
        >>> state = opt.init(params)
        >>> for g in ([1.0, 1.0, -1.0, 1.0], [1.0, -1.0, 1.0, 0.0]):
        ...     _, state = opt.update({'w': jnp.array(g)}, state, params)
        >>> state[0].flip_fraction, state[0].agreement
        (Array(0.5, dtype=float32), Array(0.75, dtype=float32))
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SignMonitorState:
        previous = jax.tree.map(
            lambda p: sharding.zeros_like_sharded(p, dtype=jnp.int8), params
        )
        # Two arrays, not one twice: a donated state must not hold a buffer twice.
        state = SignMonitorState(
            inner.init(params), previous, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
        )
        return sharding.place_like_params(state, params)

    def update_fn(
        updates: optax.Updates,
        state: SignMonitorState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SignMonitorState]:
        grads = updates
        direction, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        signs = jax.tree.map(_signs, direction)
        new_state = SignMonitorState(
            inner_state=inner_state,
            previous_sign=signs,
            flip_fraction=sign_flip_fraction(state.previous_sign, signs),
            agreement=sign_agreement(signs, grads),
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
