r"""The Lion direction: ``scale_by_lion`` (no learning rate, no weight decay).

One parameter's step is one pure function, :func:`lion_leaf_step`, whose
stages read as the maths:

1. :func:`zero_nonfinite`: a NaN or Inf gradient element counts as 0 (the
   default; ``nonfinite='propagate'`` skips this stage);
2. decode the stored momentum (:mod:`momentum_storage`);
3. :func:`interpolation`: :math:`c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`;
4. :func:`momentum_update`: :math:`m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t`,
   or :math:`m_{t-1}` on a step that must not happen (:func:`keep_unless`);
5. encode :math:`m_t` into its storage (rounded stochastically into a lossy one).

Then the kappa (``sign``) maps the tree of interpolations to directions, and
Cautious Lion masks them. How stage 3 is written for each compiler is
:mod:`formulation`'s business (XLA:CPU reads :math:`c_t` back from the stored
:math:`m_t`; the accelerators use the order above); int8 momentum on TPU is a
Pallas kernel (:mod:`int8_kernel`).
"""

import functools
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import (
    formulation,
    int8_kernel,
    momentum_storage,
    options,
    reductions,
    sharding,
    validation,
)
from lion_optax._src import kappa as kappa_lib
from lion_optax._src import rounding as rounding_lib
from lion_optax._src.numerics import compute_dtype
from lion_optax._src.options import Cautious, NonfiniteElements
from lion_optax._src.rounding import Rounding

# optax's own state class, so that lion()'s state is optax.lion's.
ScaleByLionState: TypeAlias = optax.ScaleByLionState
ScaleByLionInt8State = momentum_storage.ScaleByLionInt8State


# ---------------------------------------------------------------------------
# The stages of one parameter's step.


def zero_nonfinite(g: jax.Array) -> jax.Array:
    """``g`` with its NaN and Inf elements replaced by 0.

    Applied to the gradient before anything reads it, so that for finite
    gradients the arithmetic after it is exactly ``optax.scale_by_lion``'s,
    and a bad element's coordinate steps as if its gradient were 0 (its
    momentum decays by :math:`\\beta_2`). One select, which the compilers fuse
    into the step (on TPU a select between two results would split it).
    """
    return jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g))


def momentum_update(m: jax.Array, g: jax.Array, b2: Any) -> jax.Array:
    r""":math:`m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t` (optax's order of operations)."""
    return (1.0 - b2) * g + b2 * m


def interpolation(m: jax.Array, g: jax.Array, b1: Any) -> jax.Array:
    r""":math:`c_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t` (optax's order of operations)."""
    return (1.0 - b1) * g + b1 * m


def keep_unless(step_is_valid: jax.Array | None, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new``, or ``old`` when the step must not happen (``step_is_valid`` False)."""
    return new if step_is_valid is None else jnp.where(step_is_valid, new, old)


def _agreement(u: jax.Array, g: jax.Array) -> jax.Array:
    # sign(u) sign(g) is exact where the product u * g could underflow to 0.
    return (jnp.sign(u) * jnp.sign(g).astype(u.dtype) > 0).astype(u.dtype)


def kept_fractions(
    directions: list[jax.Array], grads: list[jax.Array], nonfinite: str = 'propagate'
) -> list[jax.Array]:
    r"""Per parameter :math:`\mathrm{mean}(\phi)`, :math:`\phi = 1[u g > 0]`: what Cautious Lion keeps.

    With ``nonfinite='zero'`` a non-finite gradient element counts as 0 (never
    kept). Same-shaped parameters share one reduction
    (:func:`reductions.sums`).
    """
    agreements = []
    for u, g in zip(directions, grads):
        g = jnp.asarray(g).astype(u.dtype)
        if nonfinite == 'zero':
            g = zero_nonfinite(g)
        agreements.append(_agreement(u, g))
    return [total / a.size for total, a in zip(reductions.sums(agreements), agreements)]


def cautious_mask(
    u: jax.Array, g: jax.Array, eps: float, mean: jax.Array | None = None
) -> jax.Array:
    r""":math:`\phi u / (\mathrm{mean}(\phi) + \epsilon)` with :math:`\phi = 1[u g > 0]`.

    ``mean``: :math:`\mathrm{mean}(\phi)` when already computed (in a pass of
    its own, see :func:`scale_by_lion`).
    """
    agree = _agreement(u, g)
    if mean is None:
        mean = jnp.mean(agree)
    return agree * u / (mean.astype(u.dtype) + eps)


class LeafStep(NamedTuple):
    """What :func:`lion_leaf_step` returns for one parameter.

    Attributes:
      interpolation: :math:`c_t` in the compute dtype (for the int8 TPU kernel,
        its sign: see :mod:`int8_kernel`).
      gradient: :math:`g_t` as the step used it (non-finite elements zeroed).
      stored: the new stored momentum.
      scales: the new int8 scales (the unchanged zero-size scales of a float
        storage).
    """

    interpolation: jax.Array
    gradient: jax.Array
    stored: jax.Array
    scales: Any


def lion_leaf_step(
    g: jax.Array,
    stored: jax.Array,
    scales: Any,
    word: jax.Array,
    step_is_valid: jax.Array | None,
    *,
    b1: Any,
    b2: Any,
    storage: momentum_storage.LeafStorage,
    nonfinite: NonfiniteElements,
    read_back: tuple[float, float] | None = None,
    barrier: bool = True,
    cpu: bool = False,
    zero_first: bool = True,
) -> LeafStep:
    r"""One parameter's Lion step: interpolation and new stored momentum.

    .. math::

      g_t \leftarrow g_t\,\mathbb{1}[g_t\ \text{finite}], \quad
      c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    computed in float32 (or wider) whatever the storage, and stored in it.

    Args:
      g: the parameter's gradient.
      stored: its stored momentum (float, or int8 codes).
      scales: int8 scales (zero-size for a float storage; may be None).
      word: this step's random word (:func:`rounding_lib.step_word`), for
        stochastic rounding into a lossy storage.
      step_is_valid: a bool scalar, or None: when False the momentum is kept
        (the caller zeroes the direction).
      b1, b2: Lion's rates.
      storage: how the momentum is stored (:class:`LeafStorage`).
      nonfinite: ``'zero'`` (non-finite gradient elements count as 0) or
        ``'propagate'``.
      read_back: ``(k1, k2)`` to read :math:`c_t` from the stored new
        momentum (:func:`formulation.momentum_first_coefficients`; XLA:CPU's
        form, and TPU's for bf16/fp16 parameters); None for optax's order.
      barrier: with ``read_back``, put an optimisation barrier after the
        store (XLA:CPU's form; see :mod:`formulation`).
      cpu: XLA:CPU's form of the int8 block maximum (same values).
      zero_first: zero the non-finite gradient elements before the arithmetic
        (the accelerators' form: one select, which fuses on TPU) rather than
        select between the results (XLA:CPU's form: XLA:CPU contracts
        multiply-adds into FMAs, and only this form contracts them as it
        does optax's expression, which keeps the numbers bit for bit
        optax's). The values are the same up to that contraction.

    Returns:
      A :class:`LeafStep`.
    """
    dtype = compute_dtype(g) if storage.quantized else compute_dtype(g, stored)
    finite = None

    def gradient(g: jax.Array) -> jax.Array:
        nonlocal finite
        g = jnp.asarray(g).astype(dtype)
        if nonfinite == 'zero':
            if zero_first:
                g = zero_nonfinite(g)
            else:
                finite = jnp.isfinite(g)
        return g

    def guarded(value: jax.Array, value_at_zero_gradient: jax.Array) -> jax.Array:
        return value if finite is None else jnp.where(finite, value, value_at_zero_gradient)

    def new_momentum(stored: jax.Array, scales: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        m_old = momentum_storage.decode(storage, stored, scales, dtype)
        m_new = guarded(momentum_update(m_old, g, b2), b2 * m_old)
        return m_old, keep_unless(step_is_valid, m_new, m_old)

    block_maxima = None
    if storage.quantized and not cpu:
        # int8's block maxima get a pass of their own; the barrier (on the
        # inputs as given, so that nothing is materialised) makes the step
        # recompute the momentum after it: the compiler reads the codes and the
        # gradient once for the maxima and once for the step, and writes each
        # output once (else it may split the step around the reduction).
        maxima = momentum_storage.block_maxima(
            new_momentum(stored, scales, gradient(g))[1], storage.block_size, cpu=False
        )
        stored, scales, g, block_maxima = jax.lax.optimization_barrier((stored, scales, g, maxima))
    g = gradient(g)
    m_old, m_new = new_momentum(stored, scales, g)
    bits = rounding_lib.random_bits(word, g.shape, salt=g) if storage.random else None
    new_stored, new_scales = momentum_storage.encode(
        storage, m_new, bits, cpu=cpu, scales=block_maxima
    )
    if new_scales is None:
        new_scales = scales  # a float leaf: nothing (or zero-size scales) to update
    elif step_is_valid is not None:
        # Re-encoding the kept momentum is not the identity for int8 (the block
        # maximum of the decoded codes is the scale only to rounding, and stochastic
        # rounding may move a code): a step that must not happen keeps the codes and
        # scales bit for bit. The old codes are read anyway; the select fuses.
        new_stored = jnp.where(step_is_valid, new_stored, stored)
        new_scales = jnp.where(step_is_valid, new_scales, scales)
    if read_back is None:
        c = guarded(interpolation(m_old, g, b1), b1 * m_old)
    else:
        if barrier:
            # The barrier keeps XLA:CPU from recomputing the stored momentum from
            # the old one inside the update's loop (which would read the old
            # momentum after its in-place update, and so force a copy of it).
            new_stored, new_scales = jax.lax.optimization_barrier((new_stored, new_scales))
        m_read = momentum_storage.decode(storage, new_stored, new_scales, dtype)
        c = guarded(
            formulation.interpolation_from_new_momentum(m_read, g, read_back), read_back[0] * m_read
        )
    if finite is not None:
        g = jnp.where(finite, g, jnp.zeros_like(g))  # the gradient as counted (cautious reads it)
    return LeafStep(c, g, new_stored, new_scales)


class LeafConfig(NamedTuple):
    """What is fixed about one parameter's step when the optimizer is built (hashable).

    Attributes:
      storage: how its momentum is stored.
      nonfinite: ``'zero'`` or ``'propagate'``.
      sign: whether the kappa is ``sign``.
      betas: ``(b1, b2)`` as Python floats, compiled in as constants; None
        when they are traced (then passed to the step).
      read_back: XLA:CPU's ``(k1, k2)`` (:func:`formulation.momentum_first_coefficients`),
        or None for optax's order on every platform.
    """

    storage: momentum_storage.LeafStorage
    nonfinite: NonfiniteElements
    sign: bool
    betas: tuple[float, float] | None
    read_back: tuple[float, float] | None


def _betas(config: LeafConfig, traced: Any) -> tuple[Any, Any]:
    return config.betas if config.betas is not None else traced


# Each function below is traced once per distinct parameter shape and storage
# (a model's blocks repeat the same shapes), not once per parameter: that is
# most of the time spent building the step before the compiler starts.
@functools.partial(jax.jit, static_argnames=('config',))
def leaf_step_for_every_platform(
    g: jax.Array,
    stored: jax.Array,
    scales: Any,
    word: jax.Array,
    step_is_valid: jax.Array | None,
    traced_betas: Any,
    *,
    config: LeafConfig,
) -> LeafStep:
    """:func:`lion_leaf_step` in the form of each platform it may compile for.

    XLA:CPU: ``read_back`` with the barrier, the select between results, the
    variadic block maximum; TPU: the int8 kernel where it applies, and
    ``read_back`` without the barrier for bf16/fp16 parameters with a lossy
    momentum; GPU (and TPU otherwise): optax's order. See :mod:`formulation`.
    """
    b1, b2 = _betas(config, traced_betas)
    storage = config.storage
    tpu_kernel = int8_kernel.applies(g, storage, sign=config.sign, nonfinite=config.nonfinite)
    # TPU: for bf16/fp16 parameters with a lossy momentum, XLA fuses the
    # parameter's step into one kernel only when c is read back from the
    # stored momentum (without the barrier); see tests/test_formulation.py.
    tpu_read_back = config.read_back if (
        config.read_back is not None
        and storage.lossy
        and rounding_lib.is_narrower_float(jnp.result_type(g))
    ) else None

    def form(platform: str) -> LeafStep:
        if platform == 'tpu' and tpu_kernel:
            return int8_kernel.int8_leaf_step(
                g, stored, scales, word, step_is_valid, b1=b1, b2=b2, storage=storage,
                nonfinite=config.nonfinite,
            )
        read_back = {'cpu': config.read_back, 'tpu': tpu_read_back}.get(platform)
        return lion_leaf_step(
            g, stored, scales, word, step_is_valid, b1=b1, b2=b2, storage=storage,
            nonfinite=config.nonfinite, read_back=read_back, barrier=platform == 'cpu',
            cpu=platform == 'cpu', zero_first=platform != 'cpu',
        )

    needs_cpu = (
        config.nonfinite == 'zero' or config.read_back is not None or storage.quantized
    )
    needs_tpu = tpu_kernel or tpu_read_back is not None
    if not needs_cpu and not needs_tpu:
        return form('accelerator')  # one form everywhere: nothing to choose
    return formulation.per_platform(
        cpu=lambda: form('cpu'),
        accelerator=lambda: form('accelerator'),
        tpu=(lambda: form('tpu')) if needs_tpu else None,
    )


@functools.partial(jax.jit, static_argnames=('config',))
def interpolation_for_statistics(
    g: jax.Array, stored: jax.Array, scales: Any, traced_betas: Any, *, config: LeafConfig
) -> jax.Array:
    """:math:`c_t` in optax's order, for the reductions computed before the step."""
    b1, _ = _betas(config, traced_betas)
    storage = config.storage
    dtype = compute_dtype(g) if storage.quantized else compute_dtype(g, stored)
    g = jnp.asarray(g).astype(dtype)
    if config.nonfinite == 'zero':
        g = zero_nonfinite(g)
    return interpolation(momentum_storage.decode(storage, stored, scales, dtype), g, b1)


# ---------------------------------------------------------------------------
# The transformation.


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    kappa: kappa_lib.KappaLike = 'sign',
    cautious: bool | Cautious = False,
    nonfinite: NonfiniteElements = 'zero',
    rounding: Rounding = Rounding(),
    cautious_eps: float | None = None,
    mu_rounding: rounding_lib.RoundingMode | None = None,
    seed: int | None = None,
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

    With ``cautious=True`` or ``cautious=Cautious(eps)`` (Cautious Lion,
    Liang et al. 2024) only the coordinates where the direction agrees with
    the gradient are kept, and the kept ones are rescaled by the kept fraction
    of the array:

    .. math::

      \phi_t = \mathbb{1}[u_t g_t > 0], \qquad
      u_t \leftarrow \frac{\phi_t\, u_t}{\mathrm{mean}(\phi_t) + \epsilon}.

    Non-finite gradients. With ``nonfinite='zero'`` (default) a NaN or Inf
    gradient element counts as 0: that coordinate's momentum decays
    (:math:`m_t = \beta_2 m_{t-1}`) and its direction is
    :math:`\kappa(\beta_1 m_{t-1})`; every other coordinate steps normally,
    and nothing non-finite reaches the momentum. It fuses into the step (no
    extra memory traffic on any compiler). ``'propagate'`` lets NaN and Inf
    through, as ``optax.scale_by_lion`` does.

    Low-precision momentum. ``mu_dtype=jnp.bfloat16`` (2 bytes per parameter)
    or ``jnp.float16`` stores the momentum rounded from float32;
    ``mu_dtype='int8'`` stores int8 codes with one float32 absmax scale per
    block of 32 values along each parameter's last axis
    (:class:`Int8Momentum`; parameters under 4096 elements stay float32), in
    a :class:`ScaleByLionInt8State`. Both keep the parameter's shape and
    sharding. By default the rounding is stochastic
    (``rounding=Rounding(momentum='stochastic')``, deterministic given its
    ``seed`` and the step count): the stored momentum is unbiased, so it keeps tracking averages
    whose per-step change is below the storage's resolution, where
    round-to-nearest stalls (bf16 with ``b2=0.999`` and a constant gradient of
    1 stops at 0.5).

    Numerics: the step is computed in float32 (or wider, for float64 inputs)
    whatever the storage dtypes; the momentum is stored in ``mu_dtype`` and the
    direction is returned in the gradient's dtype. On TPU and GPU the order
    of operations is optax's, bit for bit. On XLA:CPU, when ``0 < b2`` and
    ``b1 <= b2`` are Python floats (the defaults and the paper's settings) and
    either the kappa is ``sign`` or the momentum is stored in a lossy float
    format (bf16, fp16), the interpolation is read from the stored new
    momentum :math:`\tilde m_t`,
    :math:`c_t = (\beta_1/\beta_2)\, \tilde m_t + ((\beta_2-\beta_1)/\beta_2)\, g_t`,
    which lets XLA:CPU update the momentum in place instead of copying it
    (see ``lion_optax/_src/formulation.py``): the momentum is bit-identical
    and :math:`c_t` is within :math:`9u\,(\beta_1|m_{t-1}| + (1-\beta_1)|g_t|)`,
    :math:`u = 2^{-24}`, of the reference (in a lossy storage it also carries
    :math:`\beta_1/\beta_2` times the storage's rounding error of :math:`m_t`,
    zero on average with stochastic rounding).

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
      cautious: False, True or a :class:`Cautious` (its ``eps`` caps the
        rescaling at ``1 / eps``).
      nonfinite: ``'zero'`` (non-finite gradient elements count as 0) or
        ``'propagate'``.
      rounding: a :class:`Rounding`: its ``momentum`` field (``'stochastic'``
        or ``'nearest'``) rounds a momentum stored narrower than float32, and
        its ``seed`` seeds it (its ``params`` field is :func:`lion`'s).
      cautious_eps: deprecated: write ``cautious=Cautious(eps=...)``.
      mu_rounding: deprecated: write ``rounding=Rounding(momentum=...)``.
      seed: deprecated: write ``rounding=Rounding(seed=...)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      ``optax.ScaleByLionState`` (:class:`ScaleByLionInt8State` for int8).
      Its ``update`` takes one extra keyword, ``step_is_valid`` (a bool
      scalar): when False the momentum is unchanged and the direction zero
      (the count still advances); :func:`lion` passes it to skip a step whose
      hyperparameters are invalid or whose gradient is not finite, at no cost
      in memory traffic.

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
    cautious_spec = options.resolve_cautious(
        cautious, options.deprecated('cautious_eps', cautious_eps, 'cautious=Cautious(eps=...)')
    )
    validation.check_choice('nonfinite', nonfinite, options.NONFINITE_ELEMENTS)
    rounding = rounding_lib.with_deprecated(rounding, momentum=mu_rounding, seed=seed)
    coefficients = formulation.momentum_first_coefficients(b1, b2)
    sign = kappa_lib.is_sign(kappa_fn)
    stochastic = rounding.momentum == 'stochastic'
    concrete = validation.concrete_float(b1), validation.concrete_float(b2)
    # Python-float betas are compiled in as constants (as optax does); traced
    # ones (optax.inject_hyperparams) are passed to the leaf steps.
    betas = None if None in concrete else (float(b1), float(b2))
    two_phases = cautious_spec is not None or kappa_fn.statistics is not None

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
            state: Any = ScaleByLionState(count=count, mu=mu)
        else:
            scales = treedef.unflatten([scales for _, scales in zeros])
            state = ScaleByLionInt8State(count=count, mu=mu, mu_scales=scales)
        return sharding.place_like_params(state, params)

    def leaf_config(stored: Any) -> LeafConfig:
        leaf = momentum_storage.LeafStorage(
            jnp.result_type(stored), int8.block_size if int8 else 0, stochastic
        )
        # XLA:CPU reads c back from the stored momentum where the reordering is
        # exact enough (sign: only the sign of c matters; lossy: the storage's
        # own error is larger) and possible (concrete b1 <= b2, b2 > 0).
        read_back = coefficients if (
            coefficients is not None and not leaf.quantized and (sign or leaf.lossy)
        ) else None
        return LeafConfig(leaf, nonfinite, sign, betas, read_back)

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
            scales: list[Any] = [None] * len(grads)
        else:
            scales = treedef.flatten_up_to(state.mu_scales)
        configs = [leaf_config(m) for m in stored]
        traced_betas = None if betas is not None else (b1, b2)
        statistics = means = None
        if two_phases:
            # The reductions the direction needs (the norms' statistics,
            # cautious's kept fraction) get a pass of their own over the
            # momentum and gradient as stored; the barrier makes the step
            # recompute c after it, so that the compilers write the momentum
            # in the step's one pass (else they may write it in the reduction's
            # pass and copy the old momentum for the step).
            c_first = [
                interpolation_for_statistics(g, m, sc, traced_betas, config=config)
                for g, m, sc, config in zip(grads, stored, scales, configs)
            ]
            tree_first = treedef.unflatten(c_first)
            if kappa_fn.statistics is not None:
                statistics = kappa_fn.statistics(tree_first)
            if cautious_spec is not None:
                signs = tree_first if kappa_fn.preserves_sign else kappa_fn.fn(tree_first)
                means = kept_fractions(jax.tree.leaves(signs), list(grads), nonfinite)
            grads, stored, scales, statistics, means = jax.lax.optimization_barrier(
                (grads, stored, scales, statistics, means)
            )
        word = rounding_lib.step_word(rounding.seed, rounding_lib.MOMENTUM_STREAM, state.count)
        steps = [
            leaf_step_for_every_platform(g, m, sc, word, step_is_valid, traced_betas, config=config)
            for g, m, sc, config in zip(grads, stored, scales, configs)
        ]
        interpolations = treedef.unflatten([s.interpolation for s in steps])
        if statistics is not None:
            assert kappa_fn.apply is not None
            direction = kappa_fn.apply(interpolations, statistics)
        else:
            direction = kappa_fn.fn(interpolations)
        if cautious_spec is not None:
            kept: list[Any] = list(means) if means is not None else [None] * len(steps)
            direction = treedef.unflatten([
                cautious_mask(u, s.gradient, cautious_spec.eps, mean)
                for u, s, mean in zip(treedef.flatten_up_to(direction), steps, kept)
            ])
        direction = jax.tree.map(
            lambda u, g: keep_unless(step_is_valid, u, jnp.zeros_like(u)).astype(jnp.result_type(g)),
            direction,
            updates,
        )
        count = optax.safe_increment(state.count)
        mu = treedef.unflatten([s.stored for s in steps])
        if int8 is None:
            return direction, ScaleByLionState(count=count, mu=mu)
        return direction, ScaleByLionInt8State(count, mu, treedef.unflatten([s.scales for s in steps]))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
