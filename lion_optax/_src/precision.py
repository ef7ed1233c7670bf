"""Low-precision storage that loses nothing on average: stochastic rounding and int8 momentum.

Round-to-nearest storage silently drops every change smaller than half a unit in
the last place (ulp). Two places in Lion hit this:

- the momentum ``m <- b2 m + (1 - b2) g`` in bfloat16: with ``b2 = 0.999`` a
  constant gradient of 1 moves ``m = 0.5`` by ``5e-4``, less than half of
  bf16's ulp at 0.5 (``2**-8``), so ``m`` stalls at 0.5 for ever;
- bfloat16 parameters with a small learning rate: ``1.0 - 1e-4`` rounds back to
  ``1.0`` (bf16's ulp below 1.0 is ``2**-8``), so the weights never move.

Stochastic rounding (SR) rounds ``x`` up to the next representable value with
probability equal to the distance from the value below, in units of the gap, so
``E[SR(x)] = x`` exactly and small changes land on average. This module holds:

- :func:`stochastic_round`: SR from float32 to any narrower float dtype;
- :func:`random_bits`: the cheap, deterministic random bits SR draws from;
- :class:`QuantizedMomentum` with :func:`quantize_blockwise` and
  :func:`dequantize_blockwise`: int8 values with one float32 scale per block,
  about 1 byte per parameter, for ``scale_by_lion(mu_dtype='int8')``;
- :func:`round_updates_to_params`: the transformation that makes updates to
  bf16/fp16 parameters land (``lion(param_rounding='stochastic')``).

Random bits. Drawing them with ``jax.random`` (threefry) inside the step costs
more than the whole memory-bound step on a CPU (measured: 13x). SR needs
uniform bits per element and independence across steps, not cryptographic
quality: the bits here are a Weyl sequence ``i * 0x9E3779B9 + s`` over the flat
element index ``i``, offset by a per-(seed, stream, step, leaf) word ``s`` from
an avalanching integer hash. For a given element the bits are uniform and
independent from step to step (``s`` is); within a step neighbouring elements
get well spread (low-discrepancy) offsets. Everything is a pure function of the
seed and the step count: runs are reproducible.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lion_optax._src import validation

ROUNDING_MODES = ('stochastic', 'nearest')

# Distinct streams so that the momentum's and the parameters' rounding bits
# never coincide for the same seed, step and leaf.
MOMENTUM_STREAM = 0x6D6F6D31  # 'mom1'
PARAM_STREAM = 0x70617231  # 'par1'

_WEYL = np.uint32(0x9E3779B9)  # 2**32 / golden ratio, odd


def _u32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.uint32)


def _avalanche(x: jax.Array) -> jax.Array:
    """An integer hash of uint32 words (multiply-xorshift finaliser, full avalanche)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def stream_word(seed: Any, *words: Any) -> jax.Array:
    """Hashes a seed and further words (stream, step, leaf...) into one uint32 scalar.

    Args:
      seed: an int or an integer scalar array (may be traced).
      *words: more integers or integer scalars, mixed in turn.

    Returns:
      A uint32 scalar, a different well-mixed value for each input tuple.

    Example:
      >>> from lion_optax._src.precision import stream_word
      >>> int(stream_word(0, 1)) != int(stream_word(0, 2))
      True
    """
    h = _avalanche(_u32(seed) ^ np.uint32(0x2545F491))
    for word in words:
        h = _avalanche(h + _u32(word) * _WEYL)
    return h


def random_bits(word: Any, shape: tuple[int, ...]) -> jax.Array:
    """Uniform-per-element uint32 bits for stochastic rounding, one per element.

    .. math::

      r_i = (i \\cdot \\mathtt{0x9E3779B9} + s) \\bmod 2^{32}

    over the flat index :math:`i` (a Weyl sequence) offset by ``word`` = :math:`s`
    (from :func:`stream_word`). For uniformly random ``s`` each :math:`r_i` is
    uniform; use the high bits (they are the well-spread ones). It costs one
    integer multiply-add per element and fuses into the consumer's loop.

    Args:
      word: a uint32 scalar, e.g. ``stream_word(seed, stream, step, leaf)``.
      shape: the shape of the array to round.

    Returns:
      A uint32 array of ``shape``.

    Example:
      >>> from lion_optax._src.precision import random_bits
      >>> random_bits(0, (3,)).tolist()
      [0, 2654435769, 1013904242]
    """
    size = int(np.prod(shape, dtype=np.int64))
    index = lax.iota(jnp.uint32, size).reshape(shape)
    return index * _WEYL + _u32(word)


def _is_narrower_float(dtype: Any, than: Any = jnp.float32) -> bool:
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).nmant < jnp.finfo(than).nmant


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
    bfloat16, :math:`2^{-24}` for other types). Representable values, zeros,
    infinities and NaNs are returned unchanged; values beyond the largest
    finite one round to it or to infinity.

    bfloat16 shares float32's exponent: its SR adds 16 random bits below the
    kept ones and truncates (four integer operations). Other types (float16,
    float8) use the two neighbours of the round-to-nearest value.

    Args:
      x: a float32 array (wider inputs are first rounded to float32).
      dtype: the target float dtype, narrower than float32; float32 or wider
        returns ``x`` cast to it.
      bits: uint32 array of ``x``'s shape, uniformly random per element, e.g.
        ``jax.random.bits(key, x.shape, jnp.uint32)`` or :func:`random_bits`.

    Returns:
      ``x`` rounded to ``dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lion_optax._src.precision import stochastic_round
      >>> x = jnp.full(100_000, 1.0 + 2.0**-9)  # a quarter of the way to the next bf16
      >>> bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32)
      >>> y = stochastic_round(x, jnp.bfloat16, bits).astype(jnp.float32)
      >>> sorted(set(y.tolist())), round(float(y.mean() - 1.0) * 2**9, 1)
      ([1.0, 1.0078125], 1.0)
    """
    dtype = jnp.dtype(dtype)
    if not _is_narrower_float(dtype):
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    bits = _u32(bits)
    if dtype == jnp.bfloat16:
        raw = lax.bitcast_convert_type(x, jnp.uint32)
        # Adding u in [0, 2**16) below the kept bits carries into them with
        # probability (dropped bits) / 2**16: the magnitude rounds up exactly
        # that often (sign-magnitude format: symmetric for negative numbers).
        kept = (raw + (bits >> 16)) >> 16
        rounded = lax.bitcast_convert_type(kept.astype(jnp.uint16), jnp.bfloat16)
        return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)
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


# ---------------------------------------------------------------------------
# int8 block-wise quantised momentum.


class Int8Momentum(NamedTuple):
    """The ``mu_dtype`` that stores the momentum as block-wise quantised int8.

    ``mu_dtype='int8'`` is ``Int8Momentum()``. An object rather than integer
    keywords, so that ``optax.inject_hyperparams`` leaves the (static) block
    size alone.

    Attributes:
      block_size: values per float32 scale (bitsandbytes uses 256; smaller
        blocks track small values better and cost ``4 / block_size`` bytes
        per parameter more).
      min_quantized_size: arrays with fewer elements (biases, norm scales)
        keep a float32 momentum.

    Example:
      >>> import lion_optax
      >>> tx = lion_optax.lion(1e-4, mu_dtype=lion_optax.Int8Momentum(block_size=128))
    """

    block_size: int = 256
    min_quantized_size: int = 4096


def resolve_int8(mu_dtype: Any) -> Int8Momentum | None:
    """``mu_dtype`` as an :class:`Int8Momentum`, or None when it asks for a float dtype.

    ``'int8'`` and :class:`Int8Momentum` ask for block-wise quantised int8.
    The dtype ``jnp.int8`` itself is refused (with the other integer dtypes,
    by the float check) rather than read as that: plain int8 storage of a
    momentum would round every value below 1 to 0.

    Raises:
      TypeError: for an integer dtype, with a pointer to ``'int8'``.
      ValueError: for an :class:`Int8Momentum` with a non-positive block size
        or a negative minimum size.
    """
    if isinstance(mu_dtype, Int8Momentum):
        spec = mu_dtype
    elif isinstance(mu_dtype, str) and mu_dtype == 'int8':
        spec = Int8Momentum()
    else:
        return None
    for name, value, minimum in (
        ('block_size', spec.block_size, 1),
        ('min_quantized_size', spec.min_quantized_size, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(
                f'Int8Momentum({name}={value!r}) is invalid: expected an integer >= '
                f'{minimum}, e.g. Int8Momentum(block_size=256, min_quantized_size=4096).'
            )
    return spec


class QuantizedMomentum(NamedTuple):
    """A momentum leaf stored as int8 values with one float32 scale per block.

    The leaf is flattened, zero-padded to a whole number of blocks and reshaped
    to ``(num_blocks, block_size)``; element ``j`` of block ``b`` stands for
    ``values[b, j] * scales[b] / 127``. The original shape is the parameter's.

    Attributes:
      values: int8 array of shape ``(num_blocks, block_size)``, in [-127, 127].
      scales: float32 array of shape ``(num_blocks,)``: each block's max ``|m|``.
    """

    values: jax.Array
    scales: jax.Array


def num_blocks(size: int, block_size: int) -> int:
    """Blocks of ``block_size`` needed for ``size`` elements (the last one padded)."""
    return -(-int(size) // int(block_size))


def _blocked(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    padding = num_blocks(flat.size, block_size) * block_size - flat.size
    if padding:
        flat = jnp.pad(flat, (0, padding))
    return flat.reshape(-1, block_size)


def _absmax_rows(blocks: jax.Array) -> jax.Array:
    """``max(|x|)`` of each row, NaN if the row has one.

    One variadic (max, min) reduction instead of ``jnp.max(jnp.abs(x), 1)``:
    XLA:CPU hands the latter to a library kernel that cannot fuse the
    computation of ``x`` (the new momentum), which then makes a round trip
    through memory; this one fuses it (measured 9x faster on 8M values).
    """
    init = (jnp.array(-jnp.inf, blocks.dtype), jnp.array(jnp.inf, blocks.dtype))
    high, low = jax.lax.reduce(
        (blocks, blocks),
        init,
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (1,),
    )
    return jnp.maximum(high, -low)


def quantize_blockwise(
    x: jax.Array, block_size: int, bits: jax.Array | None = None
) -> QuantizedMomentum:
    r"""Quantises ``x`` to int8 with one absmax scale per block of ``block_size`` values.

    .. math::

      s_b = \max_{j \in b} |x_j|, \qquad
      q_j = \mathrm{round}\bigl(127\, x_j / s_b\bigr) \in [-127, 127]

    With ``bits`` the rounding is stochastic (:math:`\mathbb{E}[q_j] = 127
    x_j / s_b`, so small values still move on average); without, to nearest.
    The largest element of each block is represented exactly up to float32
    rounding; the error of the others is below :math:`s_b / 127` (stochastic)
    or :math:`s_b / 254` (nearest).

    Args:
      x: a float array of any shape.
      block_size: values per block (e.g. 256, as bitsandbytes' 8-bit optimizers).
      bits: optional uint32 random bits of ``x``'s shape (see :func:`random_bits`).

    Returns:
      A :class:`QuantizedMomentum`.

    Example:
      >>> import jax.numpy as jnp
      >>> from lion_optax._src.precision import quantize_blockwise, dequantize_blockwise
      >>> q = quantize_blockwise(jnp.array([0.5, -1.0, 0.25, 2.0]), block_size=2)
      >>> q.values.tolist(), q.scales.tolist()
      ([[64, -127], [16, 127]], [1.0, 2.0])
      >>> dequantize_blockwise(q, (4,)).tolist()
      [0.5039370059967041, -1.0, 0.25196850299835205, 2.0]
    """
    blocks = _blocked(x.astype(jnp.float32), block_size)
    scales = _absmax_rows(blocks)
    inverse = jnp.where(scales > 0, 127.0 / scales, 0.0)
    scaled = blocks * inverse[:, None]
    if bits is None:
        rounded = jnp.round(scaled)
    else:
        uniform = (_blocked(_u32(bits), block_size) >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        rounded = jnp.floor(scaled + uniform)
    values = jnp.clip(rounded, -127.0, 127.0).astype(jnp.int8)
    return QuantizedMomentum(values=values, scales=scales)


def dequantize_blockwise(q: QuantizedMomentum, shape: tuple[int, ...]) -> jax.Array:
    """The float32 array of ``shape`` that a :class:`QuantizedMomentum` stands for.

    Args:
      q: the quantised array.
      shape: the original shape (the parameter's).

    Returns:
      A float32 array of ``shape``.
    """
    size = int(np.prod(shape, dtype=np.int64))
    blocks = q.values.astype(jnp.float32) * (q.scales * np.float32(1.0 / 127.0))[:, None]
    return blocks.reshape(-1)[:size].reshape(shape)


# ---------------------------------------------------------------------------
# Momentum storage: one codec per leaf, chosen once from the options and shapes.


class MomentumStorage(NamedTuple):
    """How one momentum leaf is stored (static, decided at ``init``/trace time).

    Attributes:
      kind: ``'float'`` (an array in ``dtype``) or ``'int8'`` (a
        :class:`QuantizedMomentum`).
      dtype: the float storage dtype (``'float'`` only).
      block_size: the quantisation block (``'int8'`` only).
      stochastic: whether rounding into the storage is stochastic.
    """

    kind: str
    dtype: Any
    block_size: int
    stochastic: bool

    @property
    def lossy(self) -> bool:
        """True when storing a float32 value may change it (so rounding matters)."""
        return self.kind == 'int8' or _is_narrower_float(self.dtype)


def storage_for(
    param: Any, mu_dtype: Any, *, stochastic: bool, compute_dtype: Any
) -> MomentumStorage:
    """Chooses the storage of the momentum of one parameter.

    An :class:`Int8Momentum` quantises leaves of at least ``min_quantized_size``
    elements and keeps smaller ones (biases, norm scales) in ``compute_dtype``;
    a float ``mu_dtype`` is used as is; None follows the parameter.
    """
    if isinstance(mu_dtype, Int8Momentum):
        if int(np.size(param)) >= mu_dtype.min_quantized_size:
            return MomentumStorage('int8', None, mu_dtype.block_size, stochastic)
        return MomentumStorage('float', jnp.dtype(compute_dtype), 0, stochastic)
    dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else jnp.result_type(param)
    return MomentumStorage('float', dtype, 0, stochastic)


def storage_of(stored: Any, *, stochastic: bool) -> MomentumStorage:
    """The storage of a momentum leaf as found in the state (int8 or a float dtype)."""
    if isinstance(stored, QuantizedMomentum):
        return MomentumStorage('int8', None, int(stored.values.shape[1]), stochastic)
    return MomentumStorage('float', jnp.result_type(stored), 0, stochastic)


def momentum_matches(stored: Any, grad: Any) -> bool:
    """Whether a stored momentum leaf can belong to a gradient leaf of ``grad``'s shape."""
    if isinstance(stored, QuantizedMomentum):
        blocks, block_size = stored.values.shape
        return num_blocks(np.size(grad), block_size) == blocks
    return jnp.shape(stored) == jnp.shape(grad)


def init_momentum(storage: MomentumStorage, param: Any, zeros_like: Any) -> Any:
    """Zero momentum for ``param`` in ``storage``; ``zeros_like(x, dtype)`` keeps sharding."""
    if storage.kind == 'int8':
        blocks = num_blocks(np.size(param), storage.block_size)
        return QuantizedMomentum(
            values=jnp.zeros((blocks, storage.block_size), jnp.int8),
            scales=jnp.zeros((blocks,), jnp.float32),
        )
    return zeros_like(param, storage.dtype)


def decode_momentum(storage: MomentumStorage, stored: Any, shape: tuple[int, ...], dtype: Any):
    """The stored momentum as a ``dtype`` array of ``shape``."""
    if storage.kind == 'int8':
        return dequantize_blockwise(stored, shape).astype(dtype)
    return stored.astype(dtype)


def encode_momentum(storage: MomentumStorage, value: jax.Array, word: Any) -> Any:
    """Stores ``value`` (computed in float32 or wider); ``word`` seeds stochastic rounding."""
    bits = random_bits(word, value.shape) if storage.stochastic and storage.lossy else None
    if storage.kind == 'int8':
        return quantize_blockwise(value, storage.block_size, bits)
    if bits is None:
        return value.astype(storage.dtype)
    return stochastic_round(value.astype(jnp.float32), storage.dtype, bits)


# ---------------------------------------------------------------------------
# Updates that land on low-precision parameters.


class RoundUpdatesToParamsState(NamedTuple):
    """State of :func:`round_updates_to_params`.

    Attributes:
      rounding_step: steps taken so far (int32 scalar); it seeds each step's
        rounding. (Not called ``count``, so that ``optax.tree.get(state,
        'count')`` still finds the one schedule count of a :func:`lion` state.)
    """

    rounding_step: jax.Array


def round_updates_to_params(
    rounding: str = 'stochastic', *, seed: int = 0
) -> optax.GradientTransformation:
    r"""Makes updates to bfloat16/float16 parameters land, by stochastic rounding.

    ``optax.apply_updates`` rounds ``p + u`` to the parameter's dtype to
    nearest, so an update smaller than half an ulp of ``p`` is lost (a bf16
    weight of 1.0 with ``lr=1e-4`` never moves). Placed last in a chain, this
    transformation returns, for each low-precision parameter,

    .. math::

      u' = \mathrm{SR}(p + u) - p, \qquad\text{so that}\qquad
      \texttt{apply\_updates}(p, u') = \mathrm{SR}(p + u),
      \quad \mathbb{E}[p_{t+1}] = p_t + u_t,

    with ``p + u`` computed in float32. ``u'`` is exact in the update's dtype
    whenever the step changes ``p`` by less than a factor of 2 (Sterbenz), so
    ``apply_updates`` reproduces :math:`\mathrm{SR}(p + u)` exactly. float32
    and wider parameters pass through untouched (no cost). The rounding is a
    pure function of ``seed``, the step count, the leaf and the element.

    Args:
      rounding: ``'stochastic'``, or ``'nearest'`` to pass updates through.
      seed: an integer seeding the rounding.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from lion_optax import round_updates_to_params
      >>> params = jnp.ones(4096, jnp.bfloat16)
      >>> tx = round_updates_to_params(seed=0)
      >>> state = tx.init(params)
      >>> for _ in range(50):
      ...   updates, state = tx.update(jnp.full(4096, -1e-4, jnp.bfloat16), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> round(float(1.0 - params.astype(jnp.float32).mean()), 3)  # 50 * 1e-4
      0.005
    """
    validation.check_choice('rounding', rounding, ROUNDING_MODES)
    check_seed(seed)

    def init_fn(params: optax.Params) -> RoundUpdatesToParamsState:
        del params
        return RoundUpdatesToParamsState(rounding_step=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: RoundUpdatesToParamsState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, RoundUpdatesToParamsState]:
        step = optax.safe_increment(state.rounding_step)
        if rounding == 'nearest':
            return updates, RoundUpdatesToParamsState(step)
        if params is None:
            raise ValueError(
                'round_updates_to_params needs the parameters to round p + u: call '
                'update(grads, state, params).'
            )
        update_leaves, treedef = jax.tree.flatten(updates)
        param_leaves = treedef.flatten_up_to(params)
        rounded = []
        for leaf_index, (u, p) in enumerate(zip(update_leaves, param_leaves)):
            p_dtype = jnp.result_type(p)
            if u is None or not _is_narrower_float(p_dtype):
                rounded.append(u)
                continue
            p32 = jnp.asarray(p).astype(jnp.float32)
            word = stream_word(seed, PARAM_STREAM, state.rounding_step, leaf_index)
            target = stochastic_round(
                p32 + u.astype(jnp.float32), p_dtype, random_bits(word, p32.shape)
            )
            rounded.append((target.astype(jnp.float32) - p32).astype(u.dtype))
        return treedef.unflatten(rounded), RoundUpdatesToParamsState(step)

    return optax.GradientTransformation(init_fn, update_fn)


def check_seed(seed: Any) -> None:
    """Refuses a ``seed`` that is not an integer (a traced integer scalar is fine)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, jax.Array)):
        raise TypeError(
            f'seed must be an integer (it seeds stochastic rounding), got {seed!r}. '
            'Pass e.g. seed=0; the same seed gives the same rounding.'
        )
