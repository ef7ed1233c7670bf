r"""The function that replaces ``sign`` in Lion: the Lion-:math:`\mathcal{K}` family.

Lion's direction is ``sign(c)`` with ``c = b1 * m + (1 - b1) * g``. Chen, Liu,
Liang and Liu (2023) show that ``sign`` is the gradient of the convex function
``K(x) = ||x||_1`` and that any (sub)gradient ``grad K`` of a convex ``K`` gives
a Lion-K. With decoupled weight decay :math:`\lambda` (the step
:math:`x \leftarrow x - \eta(\nabla K(c) + \lambda x)`), its fixed points, and
the limits of its continuous-time dynamics, solve

.. math::

    \min_x\ f(x) + \frac{1}{\lambda} K^*(\lambda x), \qquad
    K^*(y) = \sup_z\ \langle y, z\rangle - K(z),

with :math:`K^*` the convex conjugate. When :math:`K^*` is the indicator of a
unit ball (every norm :math:`K`), that is :math:`\min f` over the ball of
radius :math:`1/\lambda` in the dual norm. (Fixed point: :math:`\nabla
K(\nabla f(x)) = -\lambda x \iff -\nabla f(x) \in \partial K^*(\lambda x)` for
an even :math:`K`, the optimality condition of the problem above.)

A :class:`Kappa` bundles ``grad K`` with its documentation (``K``, ``K*`` and
the solved problem, as text) and with the feasible set in machine-readable
form (``dual_norm``, ``scope``), which :func:`constraint_diagnostics` reads.

=================  ===============================  =======================================
kappa              :math:`K(x)`                     problem solved with decay :math:`\lambda`
=================  ===============================  =======================================
``sign``           :math:`\|x\|_1`                  :math:`\min f` s.t. :math:`\|x\|_\infty \le 1/\lambda`
``clip``           :math:`\sum_i \mathrm{huber}(x_i)`  :math:`\min f + \tfrac{\lambda}{2}\|x\|_2^2` s.t. :math:`\|x\|_\infty \le 1/\lambda`
``tanh(beta)``     :math:`\sum_i \log\cosh(\beta x_i)/\beta`  :math:`\min f +` entropy barrier, :math:`\|x\|_\infty < 1/\lambda`
``lp(p)``          :math:`\|x\|_p`                  :math:`\min f` s.t. :math:`\|x\|_q \le 1/\lambda`, :math:`q = p/(p-1)`
``l2``             :math:`\|x\|_2`                  :math:`\min f` s.t. :math:`\|x\|_2 \le 1/\lambda`
=================  ===============================  =======================================

A kappa maps the whole tree of interpolated momenta ``c`` (in float32 or wider)
to a tree of directions of the same structure and shapes, so global variants
(one norm over every leaf) fit the same interface as element-wise ones.
"""

import inspect
import math
import typing
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lion_optax._src import reductions, validation
from lion_optax._src.numerics import compute_dtype
from lion_optax._src.pytree import PyTree

Scope = Literal['leaf', 'global']
SCOPES: tuple[str, ...] = typing.get_args(Scope)


class Kappa(NamedTuple):
    r"""A subgradient ``grad K`` that replaces ``sign`` in Lion, with its theory.

    Attributes:
        name: a short name for logs, e.g. ``'sign'``.
        fn: maps the tree of interpolations ``c`` to the tree of directions.
        elementwise: True when each output element depends only on the same input
            element (then the step fuses into one pass and needs no communication
            when sharded).
        k: the convex function ``K`` whose subgradient ``fn`` is, as text.
        constraint: the problem Lion-K with decoupled weight decay ``lambda``
            solves, as text.
        conjugate: the convex conjugate ``K*``, as text.
        dual_norm: the exponent ``q`` of the feasible set
            :math:`\{x : \|x\|_q \le 1/\lambda\}` (``math.inf`` for the box
            :math:`\|x\|_\infty \le 1/\lambda`), or None when unknown (a custom
            kappa that does not declare it).
        scope: ``'leaf'`` when the feasible set is a product of one ball per
            array, ``'global'`` when it is one ball over the whole tree. (For the
            box both describe the same set.)
        preserves_sign: True when every direction element has the sign of its
            ``c`` (odd, monotone kappas: sign, clip, tanh, the norms), so that
            Cautious Lion's agreement can be counted from ``c``.
        statistics: for kappas that need a reduction first (the norms): maps
            the tree of ``c`` to the statistics ``apply`` needs (a pytree of
            scalars), so the step can compute them in one pass of their own
            (see :func:`scale_by_lion`); None for element-wise kappas.
        apply: with ``statistics``: ``apply(c_tree, statistics(c_tree))`` is
            ``fn(c_tree)``.
    """

    name: str
    fn: Callable[[PyTree], PyTree]
    elementwise: bool
    k: str
    constraint: str
    conjugate: str = 'unknown'
    dual_norm: float | None = None
    scope: str = 'leaf'
    preserves_sign: bool = False
    statistics: Callable[[PyTree], Any] | None = None
    apply: Callable[[PyTree, Any], PyTree] | None = None

    @staticmethod
    def of(kappa: 'KappaLike') -> 'Kappa':
        """The :class:`Kappa` a ``kappa=`` option stands for (a name, a Kappa or a callable).

        Example:
            >>> import lion_optax
            >>> print(lion_optax.Kappa.of('clip').describe().splitlines()[0])
            kappa clip
        """
        return resolve_kappa(kappa)

    def describe(self) -> str:
        """A multi-line text with the name, ``K``, ``K*`` and the solved problem."""
        return (
            f'kappa {self.name}\n  K:  {self.k}\n  K*: {self.conjugate}\n'
            f'  with decoupled weight decay lambda, Lion-K solves: {self.constraint}'
        )


def _elementwise(fn: Callable[[jax.Array], jax.Array]) -> Callable[[PyTree], PyTree]:
    return lambda tree: jax.tree.map(fn, tree)


_BOX = '||x||_inf <= 1/lambda'

# The one tree function of classic Lion, shared by sign_kappa and lp_kappa(1.0),
# so that code paths specialised to sign can recognise it (see is_sign).
_SIGN_FN = _elementwise(jnp.sign)


def is_sign(kappa: Kappa) -> bool:
    """Whether ``kappa`` is classic Lion's ``sign`` (``sign_kappa()``, ``'hard'``,
    ``lp_kappa(1.0)``), recognised by its function, not its name.

    Example:
        >>> from lion_optax._src import kappa
        >>> kappa.is_sign(kappa.resolve_kappa('hard')), kappa.is_sign(kappa.lp_kappa(1.0))
        (True, True)
        >>> kappa.is_sign(kappa.custom_kappa(lambda c: c, name='sign'))
        False
    """
    return kappa.fn is _SIGN_FN


def sign_kappa() -> Kappa:
    r"""Classic Lion: ``sign(c)``, with ``sign(0) = 0``.

    .. math::

        K(x) = \|x\|_1, \qquad \nabla K(c) = \mathrm{sign}(c), \qquad
        K^*(y) = \begin{cases} 0 & \|y\|_\infty \le 1 \\ +\infty &
        \text{otherwise.} \end{cases}

    With decoupled weight decay :math:`\lambda`, Lion solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_\infty \le 1/\lambda`: the iterates
    first enter the box (each step shrinks the distance to it by at least the
    factor :math:`1 - \eta\lambda`), never leave it, and then descend.
    Optax's ``mode='hard'``.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax._src.kappa import sign_kappa
        >>> sign_kappa().fn({'w': jnp.array([-2.0, 0.0, 0.5])})['w']
        Array([-1.,  0.,  1.], dtype=float32)
    """
    return Kappa(
        name='sign',
        fn=_SIGN_FN,
        elementwise=True,
        k='K(x) = ||x||_1',
        constraint=f'min f(x) s.t. {_BOX}',
        conjugate='K*(y) = 0 if ||y||_inf <= 1 else +inf (indicator of the unit inf-ball)',
        dual_norm=math.inf,
        preserves_sign=True,
    )


def clip_kappa() -> Kappa:
    r"""Huber-type kappa: ``clip(c, -1, 1)`` (optax's ``mode='refined'``).

    .. math::

        K(x) = \sum_i h(x_i), \quad
        h(z) = \begin{cases} z^2/2 & |z| \le 1 \\ |z| - 1/2 &
        \text{otherwise} \end{cases}, \qquad \nabla K(c) = \mathrm{clip}(c, -1, 1),

    .. math::

        K^*(y) = \begin{cases} \tfrac12 \|y\|_2^2 & \|y\|_\infty \le 1 \\
        +\infty & \text{otherwise.} \end{cases}

    (:math:`h^*(y) = \sup_z yz - h(z)` is attained at :math:`z = y` for
    :math:`|y| \le 1` and is unbounded beyond, since :math:`h` grows with slope
    1.) So with weight decay :math:`\lambda`, :math:`\tfrac{1}{\lambda}
    K^*(\lambda x) = \tfrac{\lambda}{2}\|x\|_2^2` on the box and Lion-K solves

    .. math::

        \min_x\ f(x) + \tfrac{\lambda}{2}\|x\|_2^2 \quad \text{s.t.}\quad
        \|x\|_\infty \le 1/\lambda,

    an l2-regularised problem in Lion's box: inside it the decay acts as a
    ridge penalty of strength :math:`\lambda`. The direction is linear for
    :math:`|c| < 1`, so its scale depends on the gradient's scale.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax._src.kappa import clip_kappa
        >>> clip_kappa().fn(jnp.array([-2.0, 0.25, 3.0]))
        Array([-1.  ,  0.25,  1.  ], dtype=float32)
    """
    # The same expression as optax's 'refined' mode, so the numbers agree
    # (NaN stays NaN, as with clip).
    return Kappa(
        name='clip',
        fn=_elementwise(lambda c: jnp.where(jnp.abs(c) < 1.0, c, jnp.sign(c))),
        elementwise=True,
        k='K(x) = sum_i huber(x_i), huber(z) = z^2/2 if |z| <= 1 else |z| - 1/2',
        constraint=f'min f(x) + (lambda/2) ||x||_2^2 s.t. {_BOX}',
        conjugate='K*(y) = ||y||_2^2 / 2 if ||y||_inf <= 1 else +inf',
        dual_norm=math.inf,
        preserves_sign=True,
    )


def tanh_kappa(beta: float = 1.0) -> Kappa:
    r"""A smooth sign: ``tanh(beta * c)`` (optax's ``mode='smooth'``).

    .. math::

        K(x) = \sum_i \tfrac{1}{\beta}\log\cosh(\beta x_i), \qquad
        \nabla K(c) = \tanh(\beta c),

    .. math::

        K^*(y) = \frac{1}{\beta}\sum_i \Bigl[\tfrac{1 + y_i}{2}\log(1 + y_i) +
        \tfrac{1 - y_i}{2}\log(1 - y_i)\Bigr] \ \text{on}\ \|y\|_\infty \le 1,
        \quad +\infty \ \text{outside},

    that is :math:`\tfrac{1}{\beta}\sum_i (\log 2 - H(\tfrac{1 + y_i}{2}))`
    with :math:`H` the binary entropy in nats (the sup is attained at
    :math:`z = \mathrm{atanh}(y)/\beta`). With weight decay :math:`\lambda`,
    Lion-K solves

    .. math::

        \min_x\ f(x) + \frac{1}{\lambda\beta}\sum_i \Bigl[
        \tfrac{1 + \lambda x_i}{2}\log(1 + \lambda x_i) +
        \tfrac{1 - \lambda x_i}{2}\log(1 - \lambda x_i)\Bigr]
        \quad \text{s.t.}\quad \|x\|_\infty \le 1/\lambda.

    The penalty is finite on the box but its slope
    :math:`\mathrm{atanh}(\lambda x_i)/\beta` is infinite at the bound, so a
    minimiser with finite gradient lies strictly inside; near 0 it is the ridge
    :math:`\tfrac{\lambda}{2\beta}\|x\|_2^2`. Large :math:`\beta` approaches
    classic Lion.

    Args:
        beta: sharpness, a finite number > 0 (optax's ``smooth_beta``).

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax import tanh_kappa
        >>> tanh_kappa(beta=100.0).fn(jnp.array([-1.0, 1.0]))
        Array([-1.,  1.], dtype=float32)
    """
    validation.check_positive(
        'beta', beta, hint='beta is the sharpness of tanh(beta * c); 1.0 is optax\'s default.'
    )
    beta_value = validation.concrete_float(beta)
    beta_text = 'traced' if beta_value is None else f'{beta_value:g}'
    return Kappa(
        name=f'tanh(beta={beta_text})',
        fn=_elementwise(lambda c: jnp.tanh(beta * c)),
        elementwise=True,
        k=f'K(x) = sum_i log(cosh(beta x_i)) / beta, beta={beta_text}',
        constraint=(
            'min f(x) + 1/(lambda beta) sum_i [(1 + lambda x_i)/2 log(1 + lambda x_i) '
            f'+ (1 - lambda x_i)/2 log(1 - lambda x_i)] s.t. {_BOX} '
            '(the penalty\'s slope is infinite at the bound: minimisers lie inside)'
        ),
        conjugate=(
            'K*(y) = (1/beta) sum_i [(1 + y_i)/2 log(1 + y_i) + (1 - y_i)/2 log(1 - y_i)] '
            'if ||y||_inf <= 1 else +inf'
        ),
        dual_norm=math.inf,
        preserves_sign=True,
    )


def max_abs(c: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(c), initial=0.0)


def inverse_scale(scale: jax.Array, dtype: Any) -> jax.Array:
    """``1 / max|c|``, with a zero or subnormal ``max|c|`` taken as the smallest normal.

    A reciprocal rather than a divisor: ``c * (1 / scale)`` divides once per
    array instead of once per element, and XLA:CPU computes a division once
    and passes its result on, whereas it would copy the cheap arithmetic that
    makes ``scale`` (for ``scope='global'`` a maximum over every leaf) into
    every consumer: a step quadratic in the number of leaves.
    """
    scale = scale.astype(dtype)
    return 1.0 / jnp.maximum(scale, jnp.finfo(dtype).tiny)


def _lp_direction(c: jax.Array, inverse_scale: jax.Array, norm: jax.Array, p: float) -> jax.Array:
    """``sign(c) |c|^(p-1) / ||c||_p^(p-1)`` from ``1 / max|c|`` and ``||c / max|c| ||_p``.

    Scaling by ``1 / max|c|`` first keeps the norm free of underflow and
    overflow (``c ~ 1e-25`` squares to 0 in float32), so the direction is
    scale invariant, as ``grad ||.||_p`` is. An all-zero ``c`` gives 0; a NaN
    stays NaN.
    """
    inverse_norm = 1.0 / jnp.where(norm == 0, 1.0, norm).astype(c.dtype)
    ratio = c * inverse_scale.astype(c.dtype) * inverse_norm
    if p == 2.0:
        return ratio
    return jnp.sign(ratio) * jnp.abs(ratio) ** (p - 1.0)


def scaled_lp_sum(c: jax.Array, inverse_scale: jax.Array, p: float) -> jax.Array:
    """``sum(|c / max|c||^p)``."""
    ratio = jnp.abs(c) * inverse_scale.astype(c.dtype)
    return jnp.sum(ratio * ratio if p == 2.0 else ratio**p)


def scaled_power_sums(leaves: list[jax.Array], p: float) -> list[tuple[jax.Array, jax.Array]]:
    r"""Per array ``(s, q)``, :math:`s = \max|c|`, :math:`q = \sum_i |c_i / s|^p`, in one pass.

    One variadic reduction (LAPACK's ``nrm2`` scheme): partial results
    :math:`(s_1, q_1), (s_2, q_2)` combine into :math:`s = \max(s_1, s_2)`,
    :math:`q = q_1 (s_1/s)^p + q_2 (s_2/s)^p`. Scaling by the running maximum
    keeps the sum free of underflow and overflow (``c ~ 1e-25`` would square
    to 0 in float32), and reading ``c`` once lets the compilers compute it in
    the same pass that reads the momentum and the gradient for it (the
    maximum first, then the scaled sum, would read them twice). Arrays of the
    same shape share one reduction (:func:`reduce_leaves`).
    """

    def combine(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        (s1, q1), (s2, q2) = x, y
        s = jnp.maximum(s1, s2)
        safe = jnp.where(s > 0, s, jnp.ones_like(s))
        r1, r2 = s1 / safe, s2 / safe
        if p == 2.0:
            return s, q1 * (r1 * r1) + q2 * (r2 * r2)
        return s, q1 * r1**p + q2 * r2**p

    operands = []
    for c in leaves:
        a = jnp.abs(c)
        operands.append((a, (a > 0).astype(a.dtype)))
    return [(s, q) for s, q in reductions.reduce_leaves(operands, (0.0, 0.0), combine)]


def combine_scaled_power_sums(
    parts: list[tuple[jax.Array, jax.Array]], p: float
) -> tuple[jax.Array, jax.Array]:
    """The ``(s, q)`` of all leaves together from each leaf's :func:`scaled_power_sums`."""
    dtype = compute_dtype(*[s for s, _ in parts])
    scale = jnp.max(jnp.stack([s.astype(dtype) for s, _ in parts]))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    total = jnp.zeros([], dtype)
    for s, q in parts:
        total = total + q.astype(dtype) * (s.astype(dtype) / safe) ** p
    return scale, total


def _check_scope(scope: str) -> None:
    validation.check_choice('scope', scope, SCOPES)


def lp_kappa(p: float, *, scope: Scope = 'leaf') -> Kappa:
    r"""The gradient of the lp norm, for ``p`` in ``[1, 2]``.

    .. math::

        K(x) = \|x\|_p, \qquad
        \nabla K(c) = \frac{\mathrm{sign}(c)\,|c|^{p-1}}{\|c\|_p^{p-1}}
        \quad (0\ \text{where}\ c = 0\ \text{everywhere}),

    .. math::

        K^*(y) = \begin{cases} 0 & \|y\|_q \le 1 \\ +\infty & \text{otherwise}
        \end{cases}, \qquad \frac1p + \frac1q = 1,

    so with weight decay :math:`\lambda` Lion-K solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_q \le 1/\lambda`, with ``scope='leaf'``
    one such ball per array (``K`` the sum of the arrays' norms) or with
    ``scope='global'`` one ball over the whole tree (``K`` the norm of all
    parameters concatenated). ``p = 1`` is classic Lion (:math:`q = \infty`)
    and ``p = 2`` is normalised momentum (:math:`q = 2`).

    The direction has unit dual norm (:math:`\|\nabla K(c)\|_q = 1`), so its
    elements are about :math:`n^{-1/q}` times ``sign``'s for an array of
    :math:`n` elements: scale the learning rate up accordingly (and the decay
    down, to keep the radius :math:`1/\lambda` sensible). The norm is computed
    from ``c / max|c|``, so tiny or huge ``c`` neither underflow nor overflow.

    Args:
        p: the norm's exponent, a number in ``[1, 2]``.
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
    p_value = validation.concrete_float(p)
    if isinstance(p, bool) or p_value is None or not 1.0 <= p_value <= 2.0:
        raise ValueError(
            f'p={p!r} is outside [1, 2]. The Lion-K analysis covers lp norms with '
            '1 <= p <= 2 (p=1 is classic Lion, p=2 normalised momentum); pass a '
            'number in that range, e.g. lp_kappa(1.5).'
        )
    _check_scope(scope)
    p_value = float(p_value)
    q_value = math.inf if p_value == 1.0 else p_value / (p_value - 1.0)
    q_text = 'inf' if q_value == math.inf else f'{q_value:.4g}'
    where = 'for each array' if scope == 'leaf' else 'over the whole tree'

    statistics: Callable[[PyTree], Any] | None = None
    apply: Callable[[PyTree, Any], PyTree] | None = None
    if p_value == 1.0:
        fn = _SIGN_FN  # grad ||.||_1 = sign, whatever the scope
    else:

        def statistics(tree: PyTree) -> Any:
            """Per leaf ``(1 / max|c|, ||c / max|c| ||_p)``, of the leaf or of the whole tree."""
            leaves = jax.tree.leaves(tree)
            sums = scaled_power_sums(leaves, p_value)
            if scope == 'global' and sums:
                sums = [combine_scaled_power_sums(sums, p_value)] * len(sums)
            # The reciprocal and the power are computed once per norm (XLA:CPU
            # copies cheap scalar arithmetic, such as a sum over leaves, into each
            # consumer, but not a division or a power).
            return [
                (inverse_scale(scale, c.dtype), total.astype(c.dtype) ** (1.0 / p_value))
                for c, (scale, total) in zip(leaves, sums)
            ]

        def apply(tree: PyTree, stats: Any) -> PyTree:
            leaves, treedef = jax.tree.flatten(tree)
            return treedef.unflatten(
                [_lp_direction(c, reciprocal, norm, p_value) for c, (reciprocal, norm) in zip(leaves, stats)]
            )

        def fn(tree: PyTree) -> PyTree:
            return apply(tree, statistics(tree))

    return Kappa(
        name=f'lp(p={p_value:g}, scope={scope})',
        fn=fn,
        elementwise=p_value == 1.0,
        k=f'K(x) = ||x||_{p_value:g} ({where})',
        constraint=f'min f(x) s.t. ||x||_{q_text} <= 1/lambda ({where})',
        conjugate=(
            f'K*(y) = 0 if ||y||_{q_text} <= 1 else +inf ({where}), '
            f'q = p/(p-1) = {q_text}'
        ),
        dual_norm=q_value,
        scope='leaf' if p_value == 1.0 else scope,
        preserves_sign=True,
        statistics=statistics,
        apply=apply,
    )


def l2_kappa(*, scope: Scope = 'leaf') -> Kappa:
    r"""Normalised momentum: ``c / ||c||_2`` (0 where ``c`` is all zero).

    .. math::

        K(x) = \|x\|_2, \qquad \nabla K(c) = c / \|c\|_2, \qquad
        K^*(y) = \begin{cases} 0 & \|y\|_2 \le 1 \\ +\infty & \text{otherwise.}
        \end{cases}

    With weight decay :math:`\lambda`, Lion-K solves
    :math:`\min f(x)\ \text{s.t.}\ \|x\|_2 \le 1/\lambda` (per array, or over the
    whole tree with ``scope='global'``, which costs one scalar all-reduce when
    sharded). For :math:`f(x) = \tfrac12\|x - a\|^2` the solution is the
    projection of :math:`a` onto that ball. The same as :func:`lp_kappa` with
    ``p=2``; the direction has unit l2 norm, so use a learning rate about
    :math:`\sqrt{n}` times Lion's for an array of :math:`n` elements.

    Args:
        scope: ``'leaf'`` or ``'global'``.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax._src.kappa import l2_kappa
        >>> l2_kappa(scope='global').fn({'a': jnp.array([3.0]), 'b': jnp.array([4.0])})
        {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}
    """
    kappa = lp_kappa(2.0, scope=scope)
    where = 'for each array' if scope == 'leaf' else 'over the whole tree'
    return kappa._replace(name=f'l2(scope={scope})', k=f'K(x) = ||x||_2 ({where})')


def custom_kappa(
    fn: Callable[[jax.Array], jax.Array],
    *,
    name: str | None = None,
    elementwise: bool = False,
    k: str = 'user-supplied',
    conjugate: str = 'unknown',
    constraint: str = 'unknown (depends on the user-supplied function)',
    dual_norm: float | None = None,
) -> Kappa:
    r"""Wraps a user's function ``c -> direction``, applied to each array, as a :class:`Kappa`.

    For the Lion-K theory to apply, ``fn`` should be the (sub)gradient of a
    convex function ``K``; that is not checked, but you may document ``K``,
    ``K*`` and the solved problem, and declare the feasible set
    :math:`\|x\|_q \le 1/\lambda` (``dual_norm=q``) so that
    :func:`constraint_diagnostics` works with it. ``fn`` must keep the shape of
    its input; this is checked when the step is traced. For a function of the
    whole tree, build a :class:`Kappa` directly.

    Args:
        fn: a function of one array returning an array of the same shape.
        name: a name for logs; defaults to the function's ``__name__``.
        elementwise: whether each output element depends only on the same input
            element (a promise; it lets the step fuse).
        k, conjugate, constraint: documentation of ``K``, ``K*`` and the problem.
        dual_norm: ``q`` of the feasible set (``math.inf`` for the box), if known;
            a number >= 1.

    Returns:
        A :class:`Kappa`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lion_optax._src.kappa import custom_kappa
        >>> softsign = custom_kappa(lambda c: c / (1 + jnp.abs(c)), name='softsign')
        >>> softsign.fn(jnp.array([-1.0, 3.0]))
        Array([-0.5 ,  0.75], dtype=float32)
    """
    if isinstance(fn, Kappa) or not callable(fn):
        raise TypeError(
            f'custom_kappa expects a callable c -> direction (one array in, one array '
            f'of the same shape out), got {fn!r}. A Kappa can be passed to '
            'scale_by_lion as it is.'
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        signature = None
    if signature is not None:
        try:
            signature.bind(object())
        except TypeError as error:
            raise TypeError(
                f'kappa function {fn!r} cannot be called with one argument (the '
                f'array c): {error}. Pass a function of one array, e.g. '
                'lambda c: jnp.tanh(2.0 * c).'
            ) from error
    validation.check_bool('elementwise', elementwise)
    if dual_norm is not None:
        q = validation.concrete_float(dual_norm)
        if q is None or not q >= 1.0:
            raise ValueError(
                f'dual_norm={dual_norm!r} is invalid: expected a number q >= 1 '
                '(math.inf for the box) such that the feasible set is '
                '||x||_q <= 1/lambda, or None when unknown.'
            )
        dual_norm = float(q)
    label: str = name if name else getattr(fn, '__name__', 'custom')

    def checked(c: jax.Array) -> jax.Array:
        out = jnp.asarray(fn(c))
        if out.shape != c.shape:
            raise ValueError(
                f'kappa {label!r} returned shape {out.shape} for an input of shape '
                f'{c.shape}. A kappa maps each array c to a direction of the same '
                'shape; fix the function (e.g. avoid reductions without keepdims).'
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            out = out.astype(c.dtype)
        return out

    return Kappa(
        name=label,
        fn=_elementwise(checked),
        elementwise=elementwise,
        k=k,
        constraint=constraint,
        conjugate=conjugate,
        dual_norm=dual_norm,
        scope='leaf',
    )


# What every ``kappa=`` option accepts: a name, a Kappa, or an element-wise callable.
KappaLike = str | Kappa | Callable[[jax.Array], jax.Array]

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


def resolve_kappa(kappa: KappaLike) -> Kappa:
    """Turns the ``kappa`` option of ``scale_by_lion`` into a :class:`Kappa`.

    Args:
        kappa: a name (``'sign'``, ``'clip'`` or ``'huber'``, ``'tanh'``,
            ``'l2'``, ``'l2_global'``, or optax's ``'hard'``, ``'refined'``,
            ``'smooth'``), a :class:`Kappa` (e.g. ``lp_kappa(1.5)``,
            ``tanh_kappa(beta=2.0)``), or an element-wise callable (wrapped with
            :func:`custom_kappa`).

    Returns:
        A :class:`Kappa`.

    Example:
        >>> from lion_optax._src.kappa import resolve_kappa
        >>> resolve_kappa('refined').name
        'clip'
    """
    if isinstance(kappa, Kappa):
        if not callable(kappa.fn):
            raise TypeError(f'Kappa {kappa.name!r} has a fn that is not callable: {kappa.fn!r}.')
        if kappa.scope not in SCOPES:
            raise ValueError(
                f'Kappa {kappa.name!r} has scope={kappa.scope!r}; expected one of {SCOPES}.'
            )
        return kappa
    if isinstance(kappa, str):
        if kappa not in _NAMED_KAPPAS:
            hint = ''
            if kappa.lower().startswith('lp') or kappa == 'l1':
                hint = (
                    ' An lp kappa needs its exponent: pass kappa=lp_kappa(p=1.5) '
                    '(p in [1, 2]; scope="leaf" or "global").'
                )
            raise ValueError(
                f'kappa={kappa!r} is not a known kappa. Expected one of '
                f'{", ".join(repr(k) for k in _NAMED_KAPPAS)}, a Kappa such as '
                'lp_kappa(p=1.5) or tanh_kappa(beta=2.0), or a callable c -> '
                'direction.' + hint
            )
        return _NAMED_KAPPAS[kappa]()
    if callable(kappa):
        return custom_kappa(kappa)
    raise TypeError(
        f'kappa={kappa!r} has type {type(kappa).__name__}; expected a name such as '
        "'sign', a Kappa such as lp_kappa(1.5), or a callable c -> direction."
    )
