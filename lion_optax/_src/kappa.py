"""The function that replaces ``sign`` in Lion: the Lion-kappa family.

Lion's direction is ``sign(c)`` with ``c = b1 * m + (1 - b1) * g``. Chen, Liu,
Liang and Liu (2023) show that ``sign`` is the subgradient of the convex
function ``K(x) = ||x||_1`` and that any subgradient ``grad K`` gives a Lion-K
whose iterates, with decoupled weight decay ``lambda``, minimise
``f(x) + K*(x)`` (``K*`` the convex conjugate, scaled by ``lambda``). A
:class:`Kappa` bundles ``grad K`` with that documentation.

A kappa maps the whole tree of interpolated momenta ``c`` (in float32 or wider)
to a tree of directions of the same structure and shapes, so global variants
(one norm over every leaf) fit the same interface as element-wise ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lion_optax._src import validation

PyTree = Any


class Kappa(NamedTuple):
    """A subgradient ``grad K`` that replaces ``sign`` in Lion.

    Attributes:
        name: a short name, e.g. ``'sign'``.
        fn: maps the tree of interpolations ``c`` to the tree of directions.
        elementwise: True when each output element depends only on the same input
            element (then the step fuses into one pass and needs no communication
            when sharded).
        k: the convex function ``K`` whose subgradient ``fn`` is, as text.
        constraint: the problem Lion-K with decoupled weight decay ``lambda``
            solves, as text.
    """

    name: str
    fn: Callable[[PyTree], PyTree]
    elementwise: bool
    k: str
    constraint: str


def _elementwise(fn: Callable[[jax.Array], jax.Array]) -> Callable[[PyTree], PyTree]:
    return lambda tree: jax.tree.map(fn, tree)


def sign_kappa() -> Kappa:
    r"""Classic Lion: ``sign(c)``, with ``sign(0) = 0``.

    .. math::

        K(x) = \|x\|_1, \qquad \nabla K(c) = \mathrm{sign}(c).

    With decoupled weight decay :math:`\lambda`, Lion solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_\infty \le 1/\lambda`.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import sign_kappa
        >>> sign_kappa().fn({'w': jnp.array([-2.0, 0.0, 0.5])})['w']
        Array([-1.,  0.,  1.], dtype=float32)
    """
    return Kappa(
        name='sign',
        fn=_elementwise(jnp.sign),
        elementwise=True,
        k='K(x) = ||x||_1',
        constraint='min f(x) s.t. ||x||_inf <= 1/lambda',
    )


def clip_kappa() -> Kappa:
    r"""Huber-type kappa: ``clip(c, -1, 1)`` (optax's ``mode='refined'``).

    .. math::

        K(x) = \sum_i \mathrm{huber}(x_i), \quad
        \mathrm{huber}(z) = \begin{cases} z^2/2 & |z| \le 1 \\ |z| - 1/2 &
        \text{otherwise} \end{cases}, \qquad \nabla K(c) = \mathrm{clip}(c, -1, 1).

    :math:`K^*(x) = \|x\|^2/2` on the box :math:`\|x\|_\infty \le 1`, so with
    weight decay :math:`\lambda` Lion-K solves
    :math:`\min f(x) + \tfrac{\lambda}{2}\|x\|_2^2` (scaled)
    s.t. :math:`\|x\|_\infty \le 1/\lambda`.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import clip_kappa
        >>> clip_kappa().fn(jnp.array([-2.0, 0.25, 3.0]))
        Array([-1.  ,  0.25,  1.  ], dtype=float32)
    """
    # The same expression as optax's 'refined' mode, so the numbers agree.
    return Kappa(
        name='clip',
        fn=_elementwise(lambda c: jnp.where(jnp.abs(c) < 1.0, c, jnp.sign(c))),
        elementwise=True,
        k='K(x) = sum_i huber(x_i)',
        constraint='min f(x) + (lambda/2)||x||_2^2 s.t. ||x||_inf <= 1/lambda',
    )


def tanh_kappa(beta: float = 1.0) -> Kappa:
    r"""A smooth sign: ``tanh(beta * c)`` (optax's ``mode='smooth'``).

    .. math::

        K(x) = \sum_i \tfrac{1}{\beta}\log\cosh(\beta x_i), \qquad
        \nabla K(c) = \tanh(\beta c).

    :math:`K^*` is a scaled binary entropy on :math:`\|x\|_\infty \le 1`, a
    barrier that keeps :math:`\|x\|_\infty < 1/\lambda`; large :math:`\beta`
    approaches classic Lion.

    Args:
        beta: sharpness, > 0.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import tanh_kappa
        >>> tanh_kappa(beta=100.0).fn(jnp.array([-1.0, 1.0]))
        Array([-1.,  1.], dtype=float32)
    """
    validation.check_positive('beta', beta)
    return Kappa(
        name=f'tanh(beta={beta})',
        fn=_elementwise(lambda c: jnp.tanh(beta * c)),
        elementwise=True,
        k='K(x) = sum_i log(cosh(beta x_i)) / beta',
        constraint='min f(x) + lambda-scaled entropy barrier, ||x||_inf < 1/lambda',
    )


def _lp_direction(c: jax.Array, norm: jax.Array, p: float) -> jax.Array:
    """``sign(c) |c|^(p-1) / ||c||_p^(p-1)``, and 0 where the norm is 0."""
    safe_norm = jnp.where(norm > 0, norm, 1.0)
    direction = jnp.sign(c) * (jnp.abs(c) / safe_norm) ** (p - 1.0)
    return jnp.where(norm > 0, direction, jnp.zeros_like(direction))


def lp_kappa(p: float, *, scope: str = 'leaf') -> Kappa:
    r"""The gradient of the lp norm, for ``p`` in ``[1, 2]``.

    .. math::

        K(x) = \|x\|_p, \qquad
        \nabla K(c) = \frac{\mathrm{sign}(c)\,|c|^{p-1}}{\|c\|_p^{p-1}}.

    :math:`K^*` is the indicator of the dual ball :math:`\|x\|_q \le 1` with
    :math:`1/p + 1/q = 1`, so with weight decay :math:`\lambda` Lion-K solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_q \le 1/\lambda` (per leaf, or over the
    whole tree with ``scope='global'``). ``p = 1`` is classic Lion and ``p = 2``
    is normalised momentum. The direction has unit dual norm, so its elements
    are much smaller than ``sign``'s: scale the learning rate up accordingly.

    Args:
        p: the norm's exponent, in ``[1, 2]``.
        scope: ``'leaf'`` (a norm per array) or ``'global'`` (one norm over the
            whole tree; under sharding this costs one all-reduce of a scalar).

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import lp_kappa
        >>> lp_kappa(2.0).fn(jnp.array([3.0, 4.0]))
        Array([0.6, 0.8], dtype=float32)
    """
    p_value = validation._concrete_float(p)  # pylint: disable=protected-access
    if p_value is None or not 1.0 <= p_value <= 2.0:
        raise ValueError(
            f'p={p!r} is outside [1, 2]. The Lion-K analysis covers lp norms with '
            '1 <= p <= 2 (p=1 is classic Lion, p=2 normalised momentum); pass a '
            'float in that range.'
        )
    validation.check_choice('scope', scope, ('leaf', 'global'))
    p_value = float(p_value)

    def leaf_norm(c: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(c) ** p_value) ** (1.0 / p_value)

    if scope == 'leaf':
        fn = _elementwise(lambda c: _lp_direction(c, leaf_norm(c), p_value))
    else:

        def fn(tree: PyTree) -> PyTree:
            leaves = jax.tree.leaves(tree)
            total = sum(jnp.sum(jnp.abs(c) ** p_value) for c in leaves)
            norm = total ** (1.0 / p_value)
            return jax.tree.map(lambda c: _lp_direction(c, norm.astype(c.dtype), p_value), tree)

    q = 'inf' if p_value == 1.0 else f'{p_value / (p_value - 1.0):.4g}'
    return Kappa(
        name=f'lp(p={p_value:g}, scope={scope})',
        fn=fn,
        elementwise=p_value == 1.0 and scope == 'leaf',
        k=f'K(x) = ||x||_{p_value:g}',
        constraint=f'min f(x) s.t. ||x||_{q} <= 1/lambda ({scope})',
    )


def l2_kappa(*, scope: str = 'leaf') -> Kappa:
    r"""Normalised momentum: ``c / ||c||_2`` (0 where ``c`` is all zero).

    .. math::

        K(x) = \|x\|_2, \qquad \nabla K(c) = c / \|c\|_2.

    With weight decay :math:`\lambda`, Lion-K solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_2 \le 1/\lambda` (per leaf, or over the
    whole tree with ``scope='global'``, which costs one scalar all-reduce when
    sharded). The same as :func:`lp_kappa` with ``p=2``.

    Args:
        scope: ``'leaf'`` or ``'global'``.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import l2_kappa
        >>> l2_kappa(scope='global').fn({'a': jnp.array([3.0]), 'b': jnp.array([4.0])})
        {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}
    """
    kappa = lp_kappa(2.0, scope=scope)
    return kappa._replace(name=f'l2(scope={scope})', k='K(x) = ||x||_2')


def custom_kappa(fn: Callable[[jax.Array], jax.Array], *, name: str | None = None) -> Kappa:
    """Wraps a user's element-wise function ``c -> direction`` as a :class:`Kappa`.

    The function is applied to each leaf. It should be the subgradient of a
    convex function for the Lion-K theory to apply; that is not checked.

    Args:
        fn: a function of one array returning an array of the same shape.
        name: a name for logs; defaults to the function's ``__name__``.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import custom_kappa
        >>> custom_kappa(lambda c: jnp.sign(c) * 0.5, name='half').fn(jnp.array([2.0]))
        Array([0.5], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f'custom_kappa expects a callable c -> direction, got {fn!r}.')
    return Kappa(
        name=name or getattr(fn, '__name__', 'custom'),
        fn=_elementwise(fn),
        elementwise=False,
        k='user-supplied',
        constraint='unknown (depends on the user-supplied function)',
    )


_NAMED_KAPPAS: dict[str, Callable[[], Kappa]] = {
    'sign': sign_kappa,
    'hard': sign_kappa,  # optax's name
    'clip': clip_kappa,
    'huber': clip_kappa,
    'refined': clip_kappa,  # optax's name
    'tanh': tanh_kappa,
    'smooth': tanh_kappa,  # optax's name (smooth_beta=1)
    'l2': l2_kappa,
    'l2_global': lambda: l2_kappa(scope='global'),
}


def resolve_kappa(kappa: str | Kappa | Callable[[jax.Array], jax.Array]) -> Kappa:
    """Turns the ``kappa`` option of ``scale_by_lion`` into a :class:`Kappa`.

    Args:
        kappa: a name (``'sign'``, ``'clip'``, ``'tanh'``, ``'l2'``,
            ``'l2_global'``, or optax's ``'hard'``, ``'refined'``, ``'smooth'``), a
            :class:`Kappa`, or an element-wise callable.

    Returns:
        A :class:`Kappa`.
    """
    if isinstance(kappa, Kappa):
        return kappa
    if isinstance(kappa, str):
        if kappa not in _NAMED_KAPPAS:
            raise ValueError(
                f'kappa={kappa!r} is not a known kappa. Expected one of '
                f'{", ".join(repr(k) for k in _NAMED_KAPPAS)}, a Kappa such as '
                'lp_kappa(p=1.5) or tanh_kappa(beta=2.0), or a callable c -> '
                'direction.'
            )
        return _NAMED_KAPPAS[kappa]()
    if callable(kappa):
        return custom_kappa(kappa)
    raise TypeError(
        f'kappa={kappa!r} has type {type(kappa).__name__}; expected a name, a Kappa or a callable.'
    )
