r"""Constraint diagnostics: how far the parameters are from Lion-K's feasible set.

With decoupled weight decay :math:`\lambda`, Lion-K solves
:math:`\min f(x) + \tfrac{1}{\lambda}K^*(\lambda x)` (see
:mod:`lion_optax._src.kappa`). For every built-in kappa :math:`K^*` is infinite
outside a ball, so the iterates are driven into the feasible set

.. math::

    \mathcal{C} = \{x : \|x\|_q \le 1/\lambda\}

(:math:`q = \infty`, the box, for ``sign``, ``clip`` and ``tanh``; :math:`q = 2`
for ``l2``; :math:`q = p/(p-1)` for ``lp``). Each step shrinks the distance to
:math:`\mathcal{C}` by at least the factor :math:`1 - \eta_t\lambda`, because
the direction has :math:`\|\nabla K(c)\|_q \le 1`; once inside, the iterates
stay inside. :func:`constraint_diagnostics` measures where the parameters are
with respect to :math:`\mathcal{C}`: a pure function of the parameters, to be
called (under ``jit`` or not) next to a training step when you want to log it.
The optimizer itself computes nothing of it.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import validation
from lion_optax._src import weight_decay as weight_decay_lib
from lion_optax._src.numerics import compute_dtype
from lion_optax._src.pytree import PyTree


class ConstraintDiagnostics(NamedTuple):
    r"""Where the parameters are with respect to :math:`\|x\|_q \le 1/\lambda`.

    Overall values are float32 scalars; ``leaf_*`` fields are trees with the
    parameters' structure and one float32 scalar per array. Arrays without
    weight decay (``mask`` False, or :math:`\lambda = 0`) have no constraint:
    their values are 0 and they are left out of the overall values.

    Attributes:
        scaled_norm: :math:`\lambda\|x\|_q`, feasible when :math:`\le 1`. For the
            box (``sign``, ``clip``, ``tanh``) it is :math:`\lambda \max_i |x_i|`.
            With ``scope='leaf'`` balls, the largest over the arrays.
        distance: :math:`\max(0, \|x\|_q - 1/\lambda)`, the distance from the
            parameters to the feasible set measured in its own norm
            (:math:`\|\cdot\|_q`; exact: the radial projection attains it). With
            ``scope='leaf'`` balls, the largest over the arrays.
        at_bound_fraction: the fraction of constrained coordinates at or beyond
            the bound, :math:`\lambda\|x\|_q \ge 1 - \text{rtol}` (coordinates
            outside the set count too; ``distance`` tells them apart): for the
            box, coordinates with :math:`\lambda |x_i| \ge 1 - \text{rtol}`; for
            a ball, the coordinates of arrays (or of the whole tree, for a global
            ball) on or outside its boundary.
        leaf_scaled_norm: :math:`\lambda\|x_\ell\|_q` for each array
            :math:`x_\ell`.
        leaf_distance: :math:`\max(0, \|x_\ell\|_q - 1/\lambda)` for each
            array. (For a global ball the constraint is on the whole tree; these
            are each array's own norm, a lower bound of the global one.)
        leaf_at_bound_fraction: ``at_bound_fraction`` within each array (for a
            global ball, the overall value).
    """

    scaled_norm: jax.Array
    distance: jax.Array
    at_bound_fraction: jax.Array
    leaf_scaled_norm: PyTree
    leaf_distance: PyTree
    leaf_at_bound_fraction: PyTree

    def as_dict(self, prefix: str = 'constraint') -> dict[str, jax.Array]:
        """A flat ``{name: scalar}`` dict for a logger; leaf names are tree paths.

        Args:
            prefix: the first component of every key.

        Returns:
            ``{'constraint/scaled_norm': ..., 'constraint/w/scaled_norm': ...}``.
        """
        out = {
            f'{prefix}/scaled_norm': self.scaled_norm,
            f'{prefix}/distance': self.distance,
            f'{prefix}/at_bound_fraction': self.at_bound_fraction,
        }
        for field in ('scaled_norm', 'distance', 'at_bound_fraction'):
            tree = getattr(self, f'leaf_{field}')
            for path, value in jax.tree_util.tree_leaves_with_path(tree):
                name = jax.tree_util.keystr(path, simple=True, separator='/')
                out[f'{prefix}/{name}/{field}'] = value
        return out


def _norm(x: jax.Array, q: float) -> jax.Array:
    """``||x||_q`` in float32 (or wider), computed from ``x / max|x|`` (no overflow)."""
    x = x.astype(compute_dtype(x))
    scale = kappa_lib.max_abs(x)
    if q == math.inf:
        return scale
    inverse_scale = kappa_lib.inverse_scale(scale, x.dtype)
    return scale * kappa_lib.scaled_lp_sum(x, inverse_scale, q) ** (1.0 / q)


def _broadcast_mask(mask: Any, params: PyTree) -> PyTree:
    """The decay mask as a tree of Python bools with the params' structure."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if callable(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    except (ValueError, TypeError) as error:
        raise ValueError(
            'mask does not match the parameters: pass a tree of booleans with the '
            "parameters' structure (or a prefix of it), or a callable returning one, "
            'as for lion(mask=...).'
        ) from error
    for path, value in jax.tree_util.tree_leaves_with_path(full):
        if (
            isinstance(value, jax.core.Tracer)
            or np.ndim(value) != 0
            or not np.issubdtype(np.asarray(value).dtype, np.bool_)
        ):
            raise TypeError(
                f'mask leaf {jax.tree_util.keystr(path)} is {value!r}; expected a concrete '
                'bool (the mask decides which arrays are constrained when the diagnostics '
                'are traced).'
            )
    return jax.tree.map(bool, full)


def _effective_decay(
    weight_decay: Any, convention: str, reference_learning_rate: float | None
) -> jax.Array:
    """The paper convention's lambda (``convention`` and reference already checked)."""
    if callable(weight_decay):
        raise TypeError(
            'weight_decay is a schedule; pass its current value instead, e.g. '
            'weight_decay=schedule(step), since the feasible set moves with it.'
        )
    validation.check_nonnegative('weight_decay', weight_decay)
    decay = jnp.asarray(weight_decay, jnp.float32)
    return weight_decay_lib.paper_equivalent_decay(decay, convention, reference_learning_rate)


def constraint_diagnostics(
    params: PyTree,
    *,
    weight_decay: Any,
    kappa: kappa_lib.KappaLike = 'sign',
    mask: Any | Callable[[PyTree], Any] | None = None,
    weight_decay_convention: weight_decay_lib.WeightDecayConvention = 'paper',
    rtol: float = 1e-2,
    convention: weight_decay_lib.WeightDecayConvention | None = None,
    reference_learning_rate: float | None = None,
) -> ConstraintDiagnostics:
    r"""Measures the parameters against Lion-K's feasible set :math:`\|x\|_q \le 1/\lambda`.

    .. math::

        \text{scaled\_norm} = \lambda\|x\|_q, \qquad
        \text{distance} = \max\bigl(0,\ \|x\|_q - 1/\lambda\bigr), \qquad
        \text{at\_bound} = \mathbb{1}\bigl[\lambda\|x\|_q \ge 1 - \text{rtol}\bigr]

    For classic Lion (``kappa='sign'``, :math:`q = \infty`) these are
    :math:`\lambda\max_i|x_i|`, how far the largest weight is outside
    :math:`[-1/\lambda, 1/\lambda]`, and the fraction of weights at the bound.
    A pure function of the parameters: call it (jitted or not) where you log,
    e.g. every few hundred steps; it adds nothing to the optimizer step.

    Pass the options the optimizer was built with. After the transient, for
    any kappa, ``distance`` should be 0 up to about one step
    (:math:`\eta_t(1 + \lambda\|x\|_q)` in the worst case); a growing
    ``at_bound_fraction`` says that the radius :math:`1/\lambda` is binding
    (weight decay too strong for the problem, or, for ``sign``, weights being
    pushed to :math:`\pm 1/\lambda`).

    Args:
        params: the parameter tree.
        weight_decay: the decay :math:`\lambda` as given to :func:`lion` (a
            number or a scalar array, possibly traced; for a schedule pass its
            current value).
        kappa: the optimizer's kappa (a name, a :class:`Kappa`, or a callable);
            its ``dual_norm`` and ``scope`` define the feasible set. A custom
            kappa must declare ``dual_norm``.
        mask: the decay mask given to the optimizer (tree of bools, a prefix of
            it, or a callable); arrays without decay are unconstrained.
        weight_decay_convention: ``'paper'`` or
            ``FullyDecoupled(reference_learning_rate)``, as given to :func:`lion`.
            With the latter, :math:`\lambda` is
            ``weight_decay / reference_learning_rate``.
        rtol: relative tolerance of "at the bound", in ``[0, 1)``.
        convention: deprecated: write ``weight_decay_convention=...``.
        reference_learning_rate: deprecated: write
            ``weight_decay_convention=FullyDecoupled(reference_learning_rate=...)``.

    Returns:
        A :class:`ConstraintDiagnostics`.

    Example:
        >>> import jax.numpy as jnp
        >>> import lion_optax
        >>> params = {'w': jnp.array([0.5, -2.0, 1.0, 0.1])}
        >>> d = lion_optax.constraint_diagnostics(params, weight_decay=1.0)
        >>> d.scaled_norm, d.distance, d.at_bound_fraction
        (Array(2., dtype=float32), Array(1., dtype=float32), Array(0.5, dtype=float32))
        >>> l2 = lion_optax.constraint_diagnostics(params, weight_decay=0.1, kappa='l2')
        >>> round(float(l2.scaled_norm), 4)  # 0.1 * ||w||_2
        0.2293
    """
    kappa_fn = kappa_lib.resolve_kappa(kappa)
    if kappa_fn.dual_norm is None:
        raise ValueError(
            f'kappa {kappa_fn.name!r} does not declare its feasible set. Declare it with '
            'custom_kappa(fn, dual_norm=q) (q = math.inf for the box ||x||_inf <= '
            '1/lambda), or use a built-in kappa.'
        )
    rtol_value = validation.concrete_float(rtol)
    if rtol_value is None or not 0.0 <= rtol_value < 1.0:
        raise ValueError(f'rtol={rtol!r} is invalid: expected a number in [0, 1), e.g. 1e-2.')
    name, reference = weight_decay_lib.convention_of(
        weight_decay_convention, convention=convention,
        reference_learning_rate=reference_learning_rate,
    )
    decay = _effective_decay(weight_decay, name, reference)
    decayed = _broadcast_mask(mask, params)
    q = kappa_fn.dual_norm
    box = q == math.inf
    positive = decay > 0
    safe_radius = 1.0 / jnp.where(positive, decay, 1.0)

    def measure(norm: jax.Array, on: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(scaled norm, distance, active) of one ball, all 0 when unconstrained."""
        if not on:
            zero = jnp.zeros([], jnp.float32)
            return zero, zero, zero
        scaled = jnp.where(positive, decay * norm, 0.0)
        distance = jnp.where(positive, jnp.maximum(norm - safe_radius, 0.0), 0.0)
        active = (positive & (scaled >= 1.0 - rtol_value)).astype(jnp.float32)
        return scaled, distance, active

    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(decayed)
    sizes = [int(math.prod(jnp.shape(leaf))) for leaf in leaves]
    norms = [_norm(jnp.asarray(leaf), q) for leaf in leaves]
    per_leaf = [measure(n, on) for n, on in zip(norms, flags)]
    leaf_scaled = [m[0] for m in per_leaf]
    leaf_distance = [m[1] for m in per_leaf]
    constrained = [i for i, on in enumerate(flags) if on and sizes[i] > 0]
    total = sum(sizes[i] for i in constrained)
    zero = jnp.zeros([], jnp.float32)

    if box:
        leaf_fraction = []
        for leaf, on, size in zip(leaves, flags, sizes):
            if not on or size == 0:
                leaf_fraction.append(zero)
                continue
            magnitude = jnp.abs(jnp.asarray(leaf).astype(jnp.float32))
            count = jnp.sum((decay * magnitude >= 1.0 - rtol_value) & positive)
            leaf_fraction.append(count.astype(jnp.float32) / size)
    elif kappa_fn.scope == 'leaf':
        leaf_fraction = [m[2] for m in per_leaf]
    else:
        global_norm = _norm(jnp.stack([norms[i] for i in constrained]), q) if constrained else zero
        overall = measure(global_norm, bool(constrained))
        leaf_fraction = [overall[2] if i in constrained else zero for i in range(len(leaves))]

    fraction: jax.Array | float  # a sum of arrays over an int total, or an array
    if not constrained:
        scaled_norm = distance = fraction = zero
    elif box or kappa_fn.scope == 'leaf':
        scaled_norm = jnp.max(jnp.stack([leaf_scaled[i] for i in constrained]))
        distance = jnp.max(jnp.stack([leaf_distance[i] for i in constrained]))
        fraction = sum(leaf_fraction[i] * sizes[i] for i in constrained) / total
    else:
        scaled_norm, distance, fraction = overall

    unflatten = treedef.unflatten
    return ConstraintDiagnostics(
        scaled_norm=scaled_norm,
        distance=distance,
        at_bound_fraction=jnp.asarray(fraction, jnp.float32),
        leaf_scaled_norm=unflatten(leaf_scaled),
        leaf_distance=unflatten(leaf_distance),
        leaf_at_bound_fraction=unflatten(leaf_fraction),
    )
