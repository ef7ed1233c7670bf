"""The Lion direction: ``scale_by_lion`` (no learning rate, no weight decay).

The step of one parameter reads as the maths, one named piece a line:

1. decode the stored momentum (:mod:`momentum_storage`);
2. :func:`momentum_update`: :math:`m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t`;
3. encode it back (rounded stochastically into a lossy storage);
4. :func:`interpolation` :math:`c_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t`, or
   :func:`interpolation_from_new_momentum` (the same value, read from the
   stored :math:`m_t`, which lets XLA update the momentum in place);

each guarded by :func:`zero_gradient_where_nonfinite` (by default a NaN or Inf
gradient element counts as 0),
then the kappa (``sign``) on the tree of interpolations, and the cautious mask.
"""

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import kappa as kappa_lib
from lion_optax._src import momentum_storage, rounding, sharding, validation
from lion_optax._src.numerics import compute_dtype

# optax's own state class, so that lion()'s state is optax.lion's.
ScaleByLionState: TypeAlias = optax.ScaleByLionState

NonfiniteElements = Literal['zero', 'propagate']
Rounding = Literal['stochastic', 'nearest']
NONFINITE_ELEMENTS = ('zero', 'propagate')
ROUNDING_MODES = ('stochastic', 'nearest')


class ScaleByLionInt8State(NamedTuple):
    """State of :func:`scale_by_lion` with int8 momentum (``mu_dtype='int8'``).

    Attributes:
      count: number of updates applied so far (int32 scalar).
      mu: the momentum codes, with the parameters' tree structure and shapes:
        int8 for quantised parameters, float32 for small ones.
      mu_scales: with the parameters' tree structure: each quantised
        parameter's float32 per-block scales (its shape with the last axis
        divided by the block size), zero-size for the others. The momentum is
        ``mu * mu_scales / 127`` block by block.
    """

    # `count`, as in optax's states. mypy reports a field that shadows tuple.count as an
    # incompatible override (python/mypy#3950: rename it or ignore); the name is public.
    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates
    mu_scales: optax.Updates


def momentum_first_coefficients(b1: Any, b2: Any) -> tuple[float, float] | None:
    r"""``(k1, k2)`` with :math:`c_t = k_1 m_t + k_2 g_t`, or None when not applicable.

    :math:`c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t` and
    :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t` give
    :math:`c_t = (\beta_1/\beta_2)\, m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`.
    Used only for concrete ``0 < b2`` and ``b1 <= b2`` (the defaults and the
    paper's settings): then both coefficients are in [0, 1], nothing can
    overflow that the reference does not, and the rounding error stays at the
    reference's scale (see :func:`scale_by_lion`, Numerics).
    """
    b1, b2 = validation.concrete_float(b1), validation.concrete_float(b2)
    if b1 is None or b2 is None or not 0.0 < b2 or b1 > b2:
        return None
    return b1 / b2, (b2 - b1) / b2


def zero_gradient_where_nonfinite(
    g: jax.Array, value: jax.Array, value_at_zero_gradient: jax.Array
) -> jax.Array:
    """``value``, or ``value_at_zero_gradient`` where ``g`` is NaN or Inf.

    The guard selects between results instead of zeroing ``g`` first, so that
    for finite gradients the arithmetic (and the compiler's fused
    multiply-adds) is exactly ``optax.scale_by_lion``'s.
    """
    return jnp.where(jnp.isfinite(g), value, value_at_zero_gradient)


def momentum_update(m: jax.Array, g: jax.Array, b2: Any) -> jax.Array:
    r""":math:`m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t` (optax's order of operations)."""
    return (1.0 - b2) * g + b2 * m


def interpolation(m: jax.Array, g: jax.Array, b1: Any) -> jax.Array:
    r""":math:`c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t` (optax's order of operations)."""
    return (1.0 - b1) * g + b1 * m


def interpolation_from_new_momentum(
    m_new: jax.Array, g: jax.Array, coefficients: tuple[float, float]
) -> jax.Array:
    r""":math:`c_t = k_1 m_t + k_2 g_t` (:func:`momentum_first_coefficients`)."""
    k1, k2 = coefficients
    if k1 == 0.0:
        return g
    if k2 == 0.0:
        return k1 * m_new
    return k2 * g + k1 * m_new


def cautious_mask(u: jax.Array, g: jax.Array, eps: float) -> jax.Array:
    r""":math:`\phi u / (\mathrm{mean}(\phi) + \epsilon)` with :math:`\phi = 1[u g > 0]`."""
    # sign(u) sign(g) is exact where the product u * g could underflow to 0.
    agree = (jnp.sign(u) * jnp.sign(g).astype(u.dtype) > 0).astype(u.dtype)
    return agree * u / (jnp.mean(agree) + eps)


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    kappa: str | kappa_lib.Kappa | Any = 'sign',
    cautious: bool = False,
    cautious_eps: float = 1e-3,
    nonfinite: NonfiniteElements = 'zero',
    mu_rounding: Rounding = 'stochastic',
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The Lion direction (Chen et al. 2023), without learning rate or decay.

    .. math::

      c_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
      u_t &= \kappa(c_t) \qquad (\kappa = \mathrm{sign}\ \text{for classic Lion}) \\
      m_t &= \beta_2 m_{t-1} + (1 - \beta_2) g_t

    The returned updates are :math:`u_t` (descent direction, not yet negated
    or scaled): chain :func:`add_decoupled_weight_decay` and
    ``optax.scale_by_learning_rate`` after it, as :func:`lion` does. With the
    defaults the state is ``optax.ScaleByLionState`` and the numbers are
    ``optax.scale_by_lion``'s.

    With ``cautious=True`` (Cautious Lion, Liang et al. 2024) only the
    coordinates where the direction agrees with the gradient are kept, and the
    kept ones are rescaled by the kept fraction of the array:

    .. math::

      \phi_t = \mathbb{1}[u_t g_t > 0], \qquad
      u_t \leftarrow \frac{\phi_t\, u_t}{\mathrm{mean}(\phi_t) + \epsilon}.

    Non-finite gradients. With ``nonfinite='zero'`` (default) a NaN or Inf
    gradient element counts as 0: that coordinate's momentum decays
    (:math:`m_t = \beta_2 m_{t-1}`) and its direction is
    :math:`\kappa(\beta_1 m_{t-1})`; every other coordinate steps normally,
    and nothing non-finite reaches the momentum. It costs nothing measurable
    (it fuses into the step). ``'propagate'`` lets NaN and Inf through, as
    ``optax.scale_by_lion`` does.

    Low-precision momentum. ``mu_dtype=jnp.bfloat16`` (2 bytes per parameter)
    or ``jnp.float16`` stores the momentum rounded from float32;
    ``mu_dtype='int8'`` stores int8 codes with one float32 absmax scale per
    block of 32 values along each parameter's last axis
    (:class:`Int8Momentum`; parameters under 4096 elements stay float32), in
    a :class:`ScaleByLionInt8State`. Both keep the parameter's shape and
    sharding. By default the rounding is stochastic
    (``mu_rounding='stochastic'``, deterministic given ``seed`` and the step
    count): the stored momentum is unbiased, so it keeps tracking averages
    whose per-step change is below the storage's resolution, where
    round-to-nearest stalls (bf16 with ``b2=0.999`` and a constant gradient of
    1 stops at 0.5).

    Numerics: the step is computed in float32 (or wider, for float64 inputs)
    whatever the storage dtypes; the momentum is stored in ``mu_dtype`` and the
    direction is returned in the gradient's dtype. When ``0 < b2`` and
    ``b1 <= b2`` are Python floats (the defaults and the paper's settings)
    and either the kappa is ``sign`` or the momentum is stored in a lossy
    format (bf16, fp16, int8), the interpolation is read from the stored new
    momentum :math:`\tilde m_t`,
    :math:`c_t = (\beta_1/\beta_2)\, \tilde m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`,
    which lets XLA update the momentum in place and read it once more instead
    of copying it. In float32 :math:`\tilde m_t = m_t` is bit-identical to the
    reference and :math:`c_t` differs from the reference's float32 value by
    at most :math:`9u\,(\beta_1|m_{t-1}| + (1-\beta_1)|g_t|)`,
    :math:`u = 2^{-24}`, so :math:`\mathrm{sign}(c_t)` can differ only where
    momentum and gradient cancel to 7 significant digits. In a lossy storage
    :math:`c_t` also carries :math:`(\beta_1/\beta_2)` times the storage's
    rounding error of :math:`m_t` (zero on average with stochastic rounding),
    the same size as the reference's own error from the stored
    :math:`m_{t-1}`. Otherwise (other kappas in float32, traced betas,
    ``b1 > b2``) the reference order is used, bit for bit.

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
      nonfinite: ``'zero'`` (non-finite gradient elements count as 0) or
        ``'propagate'``.
      mu_rounding: ``'stochastic'`` or ``'nearest'``: how the momentum is
        rounded into a storage narrower than float32 (ignored otherwise).
      seed: an integer seeding the stochastic rounding.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      ``optax.ScaleByLionState`` (:class:`ScaleByLionInt8State` for int8).
      Its ``update`` takes one extra keyword, ``step_is_valid`` (a bool
      scalar): when False the momentum is unchanged and the direction zero
      (the count still advances); :func:`lion` passes it to skip a step whose
      run-time hyperparameters are invalid, at no cost in memory traffic.

    Example:
      >>> import jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.scale_by_lion()
      >>> params = {'w': jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> direction, state = tx.update({'w': jnp.array([0.3, jnp.nan])}, state)
      >>> direction['w'], state.mu['w']  # the NaN element counts as 0
      (Array([1., 0.], dtype=float32), Array([0.003, 0.   ], dtype=float32))

    References:
      - Chen et al., `Symbolic Discovery of Optimization Algorithms
        <https://arxiv.org/abs/2302.06675>`_, 2023.
      - Liang et al., `Cautious Optimizers: Improving Training with One Line of
        Code <https://arxiv.org/abs/2411.16085>`_, 2024.
      - Dettmers et al., `8-bit Optimizers via Block-wise Quantization
        <https://arxiv.org/abs/2110.02861>`_, 2022.
    """
    validation.check_probability('b1', b1)
    validation.check_probability('b2', b2)
    int8 = momentum_storage.resolve_int8(mu_dtype)
    mu_dtype = int8 if int8 is not None else validation.check_float_dtype('mu_dtype', mu_dtype)
    kappa_fn = kappa_lib.resolve_kappa(kappa)
    validation.check_bool('cautious', cautious)
    validation.check_positive('cautious_eps', cautious_eps)
    validation.check_choice('nonfinite', nonfinite, NONFINITE_ELEMENTS)
    validation.check_choice('mu_rounding', mu_rounding, ROUNDING_MODES)
    validation.check_seed(seed)
    coefficients = momentum_first_coefficients(b1, b2)
    sign = kappa_lib.is_sign(kappa_fn)
    stochastic = mu_rounding == 'stochastic'

    def storage(param: Any) -> momentum_storage.LeafStorage:
        return momentum_storage.storage_for(
            param, mu_dtype, stochastic=stochastic, compute_dtype=compute_dtype(param)
        )

    def init_fn(params: optax.Params) -> ScaleByLionState | ScaleByLionInt8State:
        validation.check_float_params(params, who='scale_by_lion')
        leaves, treedef = jax.tree.flatten(params)
        zeros = [
            momentum_storage.zeros(storage(p), p, sharding.zeros_like_sharded) for p in leaves
        ]
        mu = treedef.unflatten([stored for stored, _ in zeros])
        count = jnp.zeros([], jnp.int32)
        if int8 is None:
            state = ScaleByLionState(count=count, mu=mu)
        else:
            scales = treedef.unflatten([scales for _, scales in zeros])
            state = ScaleByLionInt8State(count=count, mu=mu, mu_scales=scales)
        return sharding.place_like_params(state, params)

    def leaf_step(g, stored, scales, word, step_is_valid):
        """One parameter's interpolation and new stored momentum."""
        leaf = momentum_storage.LeafStorage(
            jnp.result_type(stored), int8.block_size if int8 else 0, stochastic
        )
        dtype = compute_dtype(g) if leaf.quantized else compute_dtype(g, stored)
        g = g.astype(dtype)
        if nonfinite == 'zero':
            guard: Callable[[jax.Array, jax.Array], jax.Array] = functools.partial(
                zero_gradient_where_nonfinite, g
            )
        else:
            guard = lambda value, value_at_zero_gradient: value  # noqa: E731
        m_old = momentum_storage.decode(leaf, stored, scales, dtype)
        m_new = guard(momentum_update(m_old, g, b2), b2 * m_old)
        if step_is_valid is not None:
            # Selected before the rounding: a stored value rounds to itself
            # (exactly for float storage), and the encoding stays the root of
            # the loop that writes the momentum (so it is not copied).
            m_new = jnp.where(step_is_valid, m_new, m_old)
        bits = rounding.random_bits(word, g.shape, salt=g) if leaf.random else None
        new_stored, new_scales = momentum_storage.encode(leaf, m_new, bits)
        if new_scales is None:
            new_scales = scales  # a float leaf: nothing (or zero-size scales) to update
        if coefficients is not None and not leaf.quantized and (sign or leaf.lossy):
            # Read the stored new momentum. The barrier keeps XLA from
            # recomputing it from the old one inside the update's loop (which
            # would read the old momentum after its in-place update, and so
            # force a copy of it).
            new_stored, new_scales = jax.lax.optimization_barrier((new_stored, new_scales))
            m_read = momentum_storage.decode(leaf, new_stored, new_scales, dtype)
            c = guard(interpolation_from_new_momentum(m_read, g, coefficients), coefficients[0] * m_read)
        else:
            c = guard(interpolation(m_old, g, b1), b1 * m_old)
        used_g = guard(g, jnp.zeros_like(g)) if cautious else g
        return c, used_g, new_stored, new_scales

    def update_fn(
        updates: optax.Updates,
        state: ScaleByLionState | ScaleByLionInt8State,
        params: optax.Params | None = None,
        *,
        step_is_valid: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByLionState | ScaleByLionInt8State]:
        del params, extra_args
        updates = validation.float_gradients(updates, who='scale_by_lion')
        validation.check_matching_trees(
            'gradient', updates, state.mu, 'momentum (from init)', who='scale_by_lion'
        )
        grads, treedef = jax.tree.flatten(updates)
        stored = treedef.flatten_up_to(state.mu)
        if int8 is None:
            scales = [None] * len(grads)
        else:
            scales = treedef.flatten_up_to(state.mu_scales)
        word = rounding.step_word(seed, rounding.MOMENTUM_STREAM, state.count)
        steps = [leaf_step(*leaf, word, step_is_valid) for leaf in zip(grads, stored, scales)]
        interpolations = [c for c, _, _, _ in steps]
        used_grads = [g for _, g, _, _ in steps]
        new_mu = [m for _, _, m, _ in steps]
        new_scales = [s for _, _, _, s in steps]
        direction = kappa_fn.fn(treedef.unflatten(interpolations))
        if cautious:
            direction = jax.tree.map(
                lambda u, g: cautious_mask(u, g, cautious_eps),
                direction,
                treedef.unflatten(used_grads),
            )
        direction = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), direction, updates)
        count = optax.safe_increment(state.count)
        if step_is_valid is not None:
            direction = jax.tree.map(lambda u: jnp.where(step_is_valid, u, 0), direction)
        mu = treedef.unflatten(new_mu)
        if int8 is None:
            return direction, ScaleByLionState(count=count, mu=mu)
        return direction, ScaleByLionInt8State(count, mu, treedef.unflatten(new_scales))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
