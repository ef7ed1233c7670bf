r"""Stochastic rounding, and the cheap random bits it draws from.

Round-to-nearest storage silently drops every change smaller than half a unit in
the last place (ulp). Two places in Lion hit this:

- the momentum ``m <- b2 m + (1 - b2) g`` in bfloat16: with ``b2 = 0.999`` a
  constant gradient of 1 moves ``m = 0.5`` by ``5e-4``, less than half of
  bf16's ulp at 0.5 (``2**-8``), so ``m`` stalls at 0.5 for ever;
- bfloat16 parameters with a small learning rate: ``1.0 - 1e-4`` rounds back to
  ``1.0``, so the weights never move.

Stochastic rounding (SR) rounds ``x`` up with probability equal to its distance
from the value below, in units of the gap, so ``E[SR(x)] = x``: small changes
land on average.

Random bits. SR needs, per element, a threshold that is uniform and independent
of the value being rounded; it needs no cryptographic quality. Drawing bits with
``jax.random`` (threefry) inside the step costs more than the whole
memory-bound step on a CPU (measured: 13x). Here the bits of element ``i`` are

.. math::

  r_i = (j_i + s_i) \cdot \mathtt{0x9E3779B9} + h \pmod{2^{32}},

with ``h`` = :func:`step_word` (a hash of the seed, the stream and the step
count, one scalar per step), ``j_i`` the element's index along the last axis
and ``s_i`` an optional *salt*: the raw bits of data at hand (the gradient
element for the momentum, the parameter for the parameters). Whatever ``j_i``
and ``s_i`` are, adding the step's uniform ``h`` makes ``r_i`` uniform and
independent of the data, so SR stays unbiased; the index and the salt only
decorrelate elements (and arrays of the same shape, rounded with the same
``h``). The salt is what lets every array use the same scalar ``h``: a
per-array constant in the compiled step would make XLA compile one kernel per
array instead of one per shape (measured on a 148-leaf GPT tree: 2.7 s instead
of 0.7 s), which is why nothing here depends on the array's position in the
tree; and few operations per element keep XLA's passes short.
"""

import typing
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lion_optax._src.options import deprecated

# Distinct streams, so that the momentum's and the parameters' rounding bits
# never coincide for the same seed and step.
MOMENTUM_STREAM = 0x6D6F6D31  # 'mom1'
PARAM_STREAM = 0x70617231  # 'par1'

_INDEX_MULTIPLIER = np.uint32(0x9E3779B9)  # 2**32 / golden ratio, odd

RoundingMode = Literal['stochastic', 'nearest']
ROUNDING_MODES: tuple[str, ...] = typing.get_args(RoundingMode)


def check_seed(seed: Any, name: str = 'seed') -> int | jax.Array:
    """``seed`` as a seed: an integer, folded into 32 bits; a traced integer scalar is kept.

    A seed only picks the stream of random bits, so any integer is fine: one
    beyond 32 bits (``2**40``) is folded into 32 (``seed mod 2**32``) here, when
    the optimizer is built, instead of overflowing at the first step.

    Raises:
      TypeError: for anything that is not an integer (a float, a string, a bool).
    """
    if isinstance(seed, jax.Array) and not isinstance(seed, jax.core.Tracer) and seed.ndim == 0:
        if jnp.issubdtype(seed.dtype, jnp.integer):
            return int(seed) % 2**32
    elif isinstance(seed, jax.core.Tracer):
        if jnp.issubdtype(seed.dtype, jnp.integer) and seed.ndim == 0:
            return seed
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        return int(seed) % 2**32
    raise TypeError(
        f'{name} must be an integer (it seeds stochastic rounding), got {seed!r}. '
        f'Pass e.g. {name}=0; the same seed gives the same rounding.'
    )


class Rounding(NamedTuple):
    """How :func:`lion` rounds into storage narrower than float32: one value, three choices.

    Rounding to nearest silently drops every change below half an ulp (a bf16
    momentum with ``b2=0.999`` stalls; a bf16 weight of 1.0 never moves with
    ``learning_rate=1e-4``); stochastic rounding lands such changes on average.

    Attributes:
      momentum: ``'stochastic'`` (default) or ``'nearest'``: a momentum stored
        in bfloat16, float16 or int8.
      params: ``'stochastic'`` (default) or ``'nearest'``: the new value of a
        bfloat16/float16 parameter (float32 parameters are not affected).
      seed: an integer seeding both stochastic roundings (the same seed and
        step give the same bits); folded into 32 bits.

    Example:
      >>> import jax.numpy as jnp, lion_optax
      >>> tx = lion_optax.lion(1e-4, mu_dtype=jnp.bfloat16,
      ...                      rounding=lion_optax.Rounding(momentum='nearest', seed=7))
    """

    momentum: RoundingMode = 'stochastic'
    params: RoundingMode = 'stochastic'
    seed: int | jax.Array = 0

    def checked(self) -> 'Rounding':
        """This value with its fields checked (and the seed folded into 32 bits)."""
        for field in ('momentum', 'params'):
            value = getattr(self, field)
            if value not in ROUNDING_MODES:
                raise ValueError(
                    f'Rounding({field}={value!r}) is not a known rounding. Expected one of '
                    f'{", ".join(repr(m) for m in ROUNDING_MODES)}.'
                )
        return self._replace(seed=check_seed(self.seed, 'Rounding(seed=...)'))


def with_deprecated(
    rounding: Any, *, momentum: Any = None, params: Any = None, seed: Any = None
) -> Rounding:
    """``rounding`` (a :class:`Rounding`) checked, with the deprecated keywords folded in.

    ``momentum``, ``params`` and ``seed`` are the deprecated ``mu_rounding``,
    ``param_rounding`` and ``seed`` keywords of :func:`lion` and
    :func:`scale_by_lion`: each given one warns and overrides its field.
    """
    if not isinstance(rounding, Rounding):
        raise TypeError(
            f'rounding must be a lion_optax.Rounding(momentum=..., params=..., seed=...), got '
            f'{rounding!r}.'
        )
    for name, field, value in (
        ('mu_rounding', 'momentum', momentum),
        ('param_rounding', 'params', params),
        ('seed', 'seed', seed),
    ):
        if deprecated(name, value, f'rounding=Rounding({field}={value!r})', stacklevel=4) is not None:
            rounding = rounding._replace(**{field: value})
    return rounding.checked()


def _u32(x: Any) -> jax.Array:
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return jnp.asarray(np.uint32(int(x) % 2**32))  # any Python int, folded into 32 bits
    return jnp.asarray(x).astype(jnp.uint32)


def _avalanche(x: jax.Array) -> jax.Array:
    """An integer hash of uint32 words (multiply-xorshift finaliser, full avalanche)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def step_word(seed: Any, stream: int, step: Any) -> jax.Array:
    """Hashes a seed, a stream and a step count into one well-mixed uint32 scalar.

    The word is computed once per step and handed to every array's loop: it
    ends in an integer division by a runtime one, which XLA counts as an
    expensive instruction and so does not copy into each consumer (it copies
    cheap scalar arithmetic, and this hash is 15 instructions: with bf16
    momentum on a 148-leaf GPT tree the optimised step had 10,700 lines
    instead of 8,500).

    Args:
      seed: an int or an integer scalar array (may be traced).
      stream: an int that separates independent uses (:data:`MOMENTUM_STREAM`,
        :data:`PARAM_STREAM`).
      step: the step count, an int or an integer scalar array (may be traced).

    Returns:
      A uint32 scalar, a different well-mixed value for each input.

    Example:
      >>> from lion_optax._src.rounding import step_word
      >>> int(step_word(0, 1, 5)) != int(step_word(0, 1, 6))
      True
    """
    h = _avalanche(_u32(seed) ^ np.uint32(0x2545F491))
    h = _avalanche(h + _u32(stream) * _INDEX_MULTIPLIER)
    h = _avalanche(h + _u32(step) * _INDEX_MULTIPLIER)
    odd = _u32(step) | np.uint32(1)  # never 0, and not a constant XLA could fold
    return h // (odd // odd)  # h // 1: see the docstring


def random_bits(word: Any, shape: tuple[int, ...], salt: jax.Array | None = None) -> jax.Array:
    r"""Uniform-per-element uint32 bits for stochastic rounding, one per element.

    .. math::

      r_i = \bigl((j_i + s_i) \cdot \mathtt{0x9E3779B9} + h\bigr) \bmod 2^{32}

    with :math:`j_i` the element's index along the last axis, :math:`s_i` the
    raw bits of ``salt`` (0 without) and :math:`h` = ``word``. For uniformly
    random :math:`h` each :math:`r_i` is uniform whatever :math:`j_i` and
    :math:`s_i` are; use the high bits. It costs four integer operations per
    element and fuses into the consumer's loop (few operations keep the
    compiled step small: see the module docstring).

    Args:
      word: a uint32 scalar, e.g. ``step_word(seed, stream, step)``.
      shape: the shape of the array to round.
      salt: optional data of ``shape`` (any 32-bit or narrower dtype) whose raw
        bits are mixed in, to decorrelate arrays rounded with the same ``word``
        and the rows of an array.

    Returns:
      A uint32 array of ``shape``.

    Example:
      >>> from lion_optax._src.rounding import random_bits
      >>> random_bits(0, (3,)).tolist()
      [0, 2654435769, 1013904242]
    """
    if shape:
        index = lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    else:
        index = jnp.zeros((), jnp.uint32)
    if salt is not None:
        index = index + raw_bits(salt)
    return index * _INDEX_MULTIPLIER + _u32(word)


def raw_bits(x: jax.Array) -> jax.Array:
    """The bit pattern of ``x`` as uint32 (narrower types zero-extended)."""
    x = jnp.asarray(x)
    width = jnp.dtype(x.dtype).itemsize
    if width == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if width == 2:
        return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def is_narrower_float(dtype: Any, than: Any = jnp.float32) -> bool:
    """Whether ``dtype`` is a float type with fewer mantissa bits than ``than``."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).nmant < jnp.finfo(than).nmant


def _stochastic_round_on_grid(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    r"""SR of float32 ``x`` to float16 (or another IEEE type with fewer bits) on its grid.

    The gap between neighbouring ``dtype`` values around ``x`` is a power of
    two, :math:`2^k` with :math:`k = \max(e, e_{\min}) - m` (``e`` the
    exponent of ``x``, ``m`` the mantissa bits, :math:`e_{\min}` the
    smallest normal exponent: subnormals share its gap). Scaling by
    :math:`2^{-k}` is exact, so :math:`\lfloor x 2^{-k} + u \rfloor 2^k`,
    :math:`u` uniform on 13 bits, is unbiased and lands on the grid; the
    conversion to ``dtype`` is then exact (or overflows to infinity). All
    element-wise integer and float arithmetic, which the TPU compiler fuses
    into the step (the neighbour search with ``nextafter`` split it into five
    kernels).
    """
    info = jnp.finfo(dtype)
    raw = lax.bitcast_convert_type(x, jnp.uint32)
    exponent = ((raw >> 23) & np.uint32(0xFF)).astype(jnp.int32) - 127
    gap = jnp.maximum(exponent, int(info.minexp)) - int(info.nmant)
    scale = lax.bitcast_convert_type(((127 - gap) << 23).astype(jnp.uint32), jnp.float32)
    unscale = lax.bitcast_convert_type(((127 + gap) << 23).astype(jnp.uint32), jnp.float32)
    # 13 random bits: x * scale < 2**(nmant + 1) and the sum stays exact in float32.
    uniform = (bits >> 19).astype(jnp.float32) * np.float32(2.0**-13)
    rounded = jnp.floor(x * scale + uniform) * unscale
    rounded = jnp.copysign(rounded, x)  # -0.0 and values that round to zero keep their sign
    return jnp.where(jnp.isfinite(x), rounded, x).astype(dtype)


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    r"""Rounds float32 ``x`` to the narrower float ``dtype``, up or down at random, unbiased.

    With :math:`x_\downarrow \le x \le x_\uparrow` the neighbouring values of
    ``dtype``,

    .. math::

      \mathrm{SR}(x) = \begin{cases}
        x_\uparrow & \text{with probability } (x - x_\downarrow) / (x_\uparrow - x_\downarrow) \\
        x_\downarrow & \text{otherwise}
      \end{cases}, \qquad \mathbb{E}[\mathrm{SR}(x)] = x,

    up to the resolution of the random bits (:math:`2^{-16}` of a gap for
    bfloat16, :math:`2^{-13}` for float16, :math:`2^{-24}` for other types). Representable values, zeros,
    infinities and NaNs are returned unchanged; values beyond the largest
    finite one round to it or to infinity.

    bfloat16 shares float32's exponent: its SR adds 16 random bits below the
    kept ones and truncates, all in integer arithmetic. float16 scales ``x``
    by its power-of-two gap and floors after adding 13 random bits. Other
    types (float8) use the two neighbours of the round-to-nearest value.

    Args:
      x: a float32 array (wider inputs are first rounded to float32).
      dtype: the target float dtype, narrower than float32; float32 or wider
        returns ``x`` cast to it.
      bits: uint32 array of ``x``'s shape, uniformly random per element, e.g.
        ``jax.random.bits(key, x.shape, jnp.uint32)`` or ``random_bits``.

    Returns:
      ``x`` rounded to ``dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax import stochastic_round
      >>> x = jnp.full(100_000, 1.0 + 2.0**-9)  # a quarter of the way to the next bf16
      >>> bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32)
      >>> y = stochastic_round(x, jnp.bfloat16, bits).astype(jnp.float32)
      >>> sorted(set(y.tolist())), round(float(y.mean() - 1.0) * 2**9, 1)
      ([1.0, 1.0078125], 1.0)
    """
    dtype = jnp.dtype(dtype)
    if not is_narrower_float(dtype):
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    bits = _u32(bits)
    if dtype == jnp.bfloat16:
        raw = lax.bitcast_convert_type(x, jnp.uint32)
        # Adding u in [0, 2**16) below the kept bits carries into them with
        # probability (dropped bits) / 2**16: the magnitude rounds up exactly
        # that often (sign-magnitude: symmetric for negative numbers). A NaN
        # keeps its sign and exponent and gets the quiet bit, so that a payload
        # in the dropped bits cannot turn it into an infinity. The kept value
        # is a float32 with 16 zero low bits, which converts to bfloat16
        # exactly. (Ending in that conversion rather than in a bitcast keeps
        # XLA:CPU from recomputing the rounding in every consumer.)
        kept = (raw + (bits >> 16)) & np.uint32(0xFFFF0000)
        return lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)
    if dtype == jnp.float16:
        return _stochastic_round_on_grid(x, dtype, bits)
    nearest = x.astype(dtype)
    near32 = nearest.astype(jnp.float32)
    error = x - near32  # exact: x and near32 are within one gap of each other
    toward = jnp.where(error > 0, jnp.array(jnp.inf, dtype), jnp.array(-jnp.inf, dtype))
    other = jnp.nextafter(nearest, toward)
    gap = other.astype(jnp.float32) - near32
    probability = jnp.where(error == 0, 0.0, error / gap)  # in [0, 1/2]
    uniform = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    moved = jnp.where(uniform < probability, other, nearest)
    return jnp.where(jnp.isfinite(x) & jnp.isfinite(near32), moved, nearest)
