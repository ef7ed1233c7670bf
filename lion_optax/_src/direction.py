"""The Lion direction: ``scale_by_lion`` (no learning rate, no weight decay)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import nonfinite, precision, sharding, validation


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Attributes:
      count: number of updates applied so far (int32 scalar).
      mu: the momentum ``m``, with the parameters' tree structure: one array
        per parameter in ``mu_dtype``, or with ``mu_dtype='int8'`` a
        :class:`QuantizedMomentum` (int8 values and per-block scales) per
        quantised parameter.
    """

    count: jax.Array
    mu: optax.Updates


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the step computes in: the widest input, and at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def momentum_first_coefficients(b1: Any, b2: Any) -> tuple[float, float] | None:
    r"""``(k1, k2)`` with :math:`c = k_1 m_t + k_2 g_t`, or None when not applicable.

    :math:`c = \beta_1 m_{t-1} + (1-\beta_1) g` and
    :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g` give
    :math:`c = (\beta_1/\beta_2)\, m_t + ((\beta_2-\beta_1)/\beta_2)\, g`. Used
    only for concrete ``0 < b2`` and ``b1 <= b2`` (the defaults and the paper's
    settings): then both coefficients are in [0, 1], nothing can overflow that
    the reference does not, and the rounding error stays at the reference's
    scale (see :func:`scale_by_lion`, Numerics).
    """
    b1, b2 = validation.concrete_float(b1), validation.concrete_float(b2)
    if b1 is None or b2 is None or not 0.0 < b2 or b1 > b2:
        return None
    return b1 / b2, (b2 - b1) / b2


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    kappa: str | kappa_lib.Kappa | Any = 'sign',
    cautious: bool = False,
    cautious_eps: float = 1e-3,
    mu_rounding: str = 'stochastic',
    seed: int = 0,
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

    Low-precision momentum. ``mu_dtype=jnp.bfloat16`` (2 bytes per parameter)
    or ``jnp.float16`` stores the momentum rounded from float32;
    ``mu_dtype='int8'`` stores int8 values with one float32 absmax scale per
    block of 256 values (``1 + 4/256`` bytes per parameter; arrays of fewer
    than 4096 elements stay in float32; :class:`Int8Momentum` sets both).
    By default the rounding is stochastic (``mu_rounding='stochastic'``,
    deterministic given ``seed``): the stored momentum is unbiased, so it keeps
    tracking averages whose per-step change is below the storage's resolution,
    where round-to-nearest stalls (bf16 with ``b2=0.999`` and a constant
    gradient of 1 stops at 0.5). ``mu_rounding='nearest'`` rounds to nearest.

    Numerics: the step is computed in float32 (or wider, for float64 inputs)
    whatever the storage dtypes; the momentum is stored in ``mu_dtype`` and the
    direction is returned in the gradient's dtype. When the momentum is stored
    exactly (float32), ``kappa='sign'`` (the default) and ``0 < b2``,
    ``b1 <= b2`` are Python floats, the interpolation is computed from the new
    momentum,
    :math:`c_t = (\beta_1/\beta_2)\, m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`,
    which lets XLA update the momentum in place and read it once more instead
    of copying it (measured on a 2-core CPU, 1M-64M parameters, without
    ``skip_nonfinite``: 1.1-1.5x the memory roofline, 1.6-4x faster than
    ``optax.lion``). :math:`m_t` is bit-identical to the reference;
    :math:`c_t` differs from the reference's float32 value by at
    most :math:`9u\,(\beta_1|m_{t-1}| + (1-\beta_1)|g_t|)`, :math:`u = 2^{-24}`
    (about 3 roundings more than the reference's own error), so
    :math:`\mathrm{sign}(c_t)` can differ only where momentum and gradient
    cancel to 7 significant digits. Otherwise (other kappas, traced betas,
    ``b1 > b2``, bfloat16/float16/int8 storage) the reference order is used,
    bit for bit.

    Args:
      b1: interpolation between momentum and gradient for the update, in [0, 1].
      b2: decay rate of the momentum, in [0, 1].
      mu_dtype: storage of the momentum: a float dtype, ``'int8'`` or an
        :class:`Int8Momentum` (block-wise quantised), or None to follow each
        parameter.
      kappa: the function replacing ``sign``: a name (``'sign'``, ``'clip'``,
        ``'tanh'``, ``'l2'``, ``'l2_global'``; optax's ``'hard'``, ``'refined'``,
        ``'smooth'``), a :class:`Kappa` (e.g. ``lp_kappa(1.5)``), or an
        element-wise callable.
      cautious: keep only coordinates where direction and gradient agree.
      cautious_eps: the :math:`\epsilon` of the cautious normaliser, > 0; it
        caps the rescaling at ``1 / cautious_eps``.
      mu_rounding: ``'stochastic'`` or ``'nearest'``: how the momentum is
        rounded into a storage narrower than float32 (ignored otherwise).
      seed: an integer seeding the stochastic rounding.

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
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2022.
    """
    return lion_direction(
        b1,
        b2,
        mu_dtype,
        kappa=kappa,
        cautious=cautious,
        cautious_eps=cautious_eps,
        mu_rounding=mu_rounding,
        seed=seed,
    )


def lion_direction(
    b1: float,
    b2: float,
    mu_dtype: Any,
    *,
    kappa: Any,
    cautious: bool,
    cautious_eps: float = 1e-3,
    mu_rounding: str = 'stochastic',
    seed: int = 0,
    inside_skip_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """:func:`scale_by_lion`, with one extra switch for :func:`lion`.

    ``inside_skip_nonfinite=True`` is for a ``scale_by_lion`` that
    :func:`skip_nonfinite` wraps, as in :func:`lion`: the interpolation then
    reads the momentum *as the wrapper stores it*,
    ``where(all_finite(g), m_t, m_{t-1})``, the very expression the wrapper
    builds, so XLA merges the two and the step reads the stored momentum
    instead of recomputing it from the old one (which forces a copy of the
    momentum). Values are unchanged: when the step is skipped the direction is
    discarded by the wrapper.
    """
    validation.check_probability('b1', b1)
    validation.check_probability('b2', b2)
    if isinstance(mu_dtype, jax.Array) and mu_dtype.ndim == 0:
        # optax.inject_hyperparams takes a dtype class such as jnp.bfloat16 for
        # a schedule (it is callable) and passes jnp.bfloat16(count): a scalar
        # of that dtype. The dtype is what was meant.
        mu_dtype = mu_dtype.dtype
    int8 = precision.resolve_int8(mu_dtype)
    if int8 is None:
        mu_dtype = validation.check_float_dtype('mu_dtype', mu_dtype)
    else:
        mu_dtype = int8
    kappa_fn = kappa_lib.resolve_kappa(kappa)
    if not isinstance(cautious, bool):
        raise TypeError(f'cautious must be True or False, got {cautious!r}.')
    validation.check_positive('cautious_eps', cautious_eps)
    validation.check_choice('mu_rounding', mu_rounding, precision.ROUNDING_MODES)
    precision.check_seed(seed)
    # Momentum-first only where the direction depends on sign(c) alone: a
    # continuous kappa would carry the few-ulp difference into its output, and
    # those keep the reference's bits.
    coefficients = momentum_first_coefficients(b1, b2) if kappa_lib.is_sign(kappa_fn) else None

    stochastic = mu_rounding == 'stochastic'

    def storage(param: Any) -> precision.MomentumStorage:
        return precision.storage_for(
            param, mu_dtype, stochastic=stochastic, compute_dtype=compute_dtype(param)
        )

    def init_fn(params: optax.Params) -> ScaleByLionState:
        validation.check_float_params(params, who='scale_by_lion')
        mu = jax.tree.map(
            lambda p: precision.init_momentum(storage(p), p, sharding.zeros_like_sharded), params
        )
        return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(
        updates: optax.Updates, state: ScaleByLionState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByLionState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        try:
            stored = treedef.flatten_up_to(state.mu)
        except (ValueError, TypeError):
            stored = None
        if stored is None or any(
            not precision.momentum_matches(s, g) for g, s in zip(grads, stored)
        ):
            validation.check_matching_trees(
                'gradient', updates, state.mu, 'momentum (from init)', who='scale_by_lion'
            )
        finite = nonfinite.all_finite(updates) if inside_skip_nonfinite else None

        interpolations, new_mu = [], []
        for index, (g, old) in enumerate(zip(grads, stored)):
            leaf_storage = precision.storage_of(old, stochastic=stochastic)
            if leaf_storage.kind == 'int8':
                dtype = compute_dtype(g)
            else:
                dtype = compute_dtype(g, old)
            g_c = g.astype(dtype)
            m_old = precision.decode_momentum(leaf_storage, old, g.shape, dtype)
            m_new = (1.0 - b2) * g_c + b2 * m_old
            word = precision.stream_word(seed, precision.MOMENTUM_STREAM, state.count, index)
            new = precision.encode_momentum(leaf_storage, m_new, word)
            if coefficients is not None and not leaf_storage.lossy:
                # Momentum-first (see Numerics): read the stored new momentum.
                # The barrier keeps XLA from recomputing it from the old one
                # inside the parameter loop (which would read the old momentum
                # after its in-place update, hence force a copy).
                new = jax.lax.optimization_barrier(new)
                if finite is not None:
                    new_read = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
                else:
                    new_read = new
                m_read = precision.decode_momentum(leaf_storage, new_read, g.shape, dtype)
                k1, k2 = coefficients
                if k1 == 0.0:
                    c = g_c
                elif k2 == 0.0:
                    c = k1 * m_read
                else:
                    c = k2 * g_c + k1 * m_read
            else:
                c = (1.0 - b1) * g_c + b1 * m_old
            interpolations.append(c)
            new_mu.append(new)

        direction = kappa_fn.fn(treedef.unflatten(interpolations))
        if cautious:
            direction = jax.tree.map(_cautious_mask(cautious_eps), direction, updates)
        direction = jax.tree.map(lambda u, g: u.astype(g.dtype), direction, updates)
        count = optax.safe_increment(state.count)
        mu = treedef.unflatten(new_mu)
        return direction, ScaleByLionState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _cautious_mask(eps: float):
    """Returns ``(u, g) -> phi * u / (mean(phi) + eps)``, ``phi = 1[u * g > 0]``."""

    def mask(u: jax.Array, g: jax.Array) -> jax.Array:
        # sign(u) sign(g) is exact where the product u * g could underflow to 0.
        agree = (jnp.sign(u) * jnp.sign(g).astype(u.dtype) > 0).astype(u.dtype)
        return agree * u / (jnp.mean(agree) + eps)

    return mask
