"""The Lion direction: ``scale_by_lion`` (no learning rate, no weight decay)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import sharding, validation


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Attributes:
      count: number of updates applied so far (int32 scalar).
      mu: the momentum ``m``, one array per parameter, in ``mu_dtype``.
    """

    count: jax.Array
    mu: optax.Updates


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the step computes in: the widest input, and at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    kappa: str | kappa_lib.Kappa | Any = 'sign',
    cautious: bool = False,
    cautious_eps: float = 1e-3,
) -> optax.GradientTransformation:
    r"""The Lion direction (Chen et al. 2023), without learning rate or decay.

    .. math::

      c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      u_t &= \kappa(c_t) \qquad (\kappa = \mathrm{sign}\ \text{for classic Lion}) \\
      m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    The returned updates are :math:`u_t` (descent direction, not yet negated
    or scaled): chain :func:`add_decoupled_weight_decay` and
    ``optax.scale_by_learning_rate`` after it, as :func:`lion` does.

    With ``cautious=True`` (Cautious Lion, Liang et al. 2024) only the
    coordinates where the direction agrees with the gradient are kept, and the
    kept ones are rescaled by the kept fraction of the array:

    .. math::

      \phi_t = \mathbb{1}[u_t g_t > 0], \qquad
      u_t \leftarrow \frac{\phi_t\, u_t}{\mathrm{mean}(\phi_t) + \epsilon}.

    Numerics: the step is computed in float32 (or wider, for float64 inputs)
    whatever the storage dtypes; the momentum is stored in ``mu_dtype`` and the
    direction is returned in the gradient's dtype.

    Args:
      b1: interpolation between momentum and gradient for the update, in [0, 1].
      b2: decay rate of the momentum, in [0, 1].
      mu_dtype: float dtype of the momentum; None follows each parameter.
      kappa: the function replacing ``sign``: a name (``'sign'``, ``'clip'``,
        ``'tanh'``, ``'l2'``, ``'l2_global'``; optax's ``'hard'``, ``'refined'``,
        ``'smooth'``), a :class:`Kappa` (e.g. ``lp_kappa(1.5)``), or an
        element-wise callable.
      cautious: keep only coordinates where direction and gradient agree.
      cautious_eps: the :math:`\epsilon` of the cautious normaliser, > 0; it
        caps the rescaling at ``1 / cautious_eps``.

    Returns:
      An ``optax.GradientTransformation`` whose state is
      :class:`ScaleByLionState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.scale_by_lion()
      >>> params = {'w': jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> direction, state = tx.update({'w': jnp.array([0.3, -0.1])}, state)
      >>> direction['w']
      Array([ 1., -1.], dtype=float32)

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023.
      Liang et al., `Cautious Optimizers: Improving Training with One Line of
      Code <https://arxiv.org/abs/2411.16085>`_, 2024.
    """
    validation.check_probability('b1', b1)
    validation.check_probability('b2', b2)
    mu_dtype = validation.check_float_dtype('mu_dtype', mu_dtype)
    kappa_fn = kappa_lib.resolve_kappa(kappa)
    if not isinstance(cautious, bool):
        raise TypeError(f'cautious must be True or False, got {cautious!r}.')
    validation.check_positive('cautious_eps', cautious_eps)

    def init_fn(params: optax.Params) -> ScaleByLionState:
        validation.check_float_params(params, who='scale_by_lion')
        mu = jax.tree.map(
            lambda p: sharding.zeros_like_sharded(p, dtype=mu_dtype or p.dtype), params
        )
        return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(
        updates: optax.Updates, state: ScaleByLionState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByLionState]:
        del params
        validation.check_matching_trees(
            'gradient', updates, state.mu, 'momentum (from init)', who='scale_by_lion'
        )

        def interpolate(g: jax.Array, m: jax.Array) -> jax.Array:
            dtype = compute_dtype(g, m)
            return (1.0 - b1) * g.astype(dtype) + b1 * m.astype(dtype)

        def new_momentum(g: jax.Array, m: jax.Array) -> jax.Array:
            dtype = compute_dtype(g, m)
            return ((1.0 - b2) * g.astype(dtype) + b2 * m.astype(dtype)).astype(m.dtype)

        interpolation = jax.tree.map(interpolate, updates, state.mu)
        direction = kappa_fn.fn(interpolation)
        if cautious:
            direction = jax.tree.map(_cautious_mask(cautious_eps), direction, updates)
        direction = jax.tree.map(lambda u, g: u.astype(g.dtype), direction, updates)
        mu = jax.tree.map(new_momentum, updates, state.mu)
        count = optax.safe_increment(state.count)
        return direction, ScaleByLionState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _cautious_mask(eps: float):
    """Returns ``(u, g) -> phi * u / (mean(phi) + eps)``, ``phi = 1[u * g > 0]``."""

    def mask(u: jax.Array, g: jax.Array) -> jax.Array:
        agree = (u * g.astype(u.dtype) > 0).astype(u.dtype)
        return agree * u / (jnp.mean(agree) + eps)

    return mask
