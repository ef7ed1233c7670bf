r"""How Lion's momentum is stored: a float dtype, or int8 with one scale per block.

One momentum leaf per parameter, decoded to float32 (or wider) for the step and
encoded back after it:

- a float dtype (``float32``, or ``bfloat16``/``float16`` for 2 bytes per
  parameter), rounded stochastically or to nearest;
- int8 codes with one float32 scale per block of ``block_size`` consecutive
  values along the parameter's **last axis** (:class:`Int8Momentum`): element
  :math:`j` of block :math:`b` stands for :math:`q_j s_b / 127` with
  :math:`s_b = \max_{j \in b} |m_j|`. The codes have the parameter's shape and
  the scales its shape with the last axis divided by the block size, so both
  take the parameter's sharding (FSDP along the first axis, tensor-parallel
  along the last when each shard holds whole blocks) and each device
  quantises its own blocks: no communication.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lion_optax._src import rounding


class Int8Momentum(NamedTuple):
    """The ``mu_dtype`` that stores the momentum as block-wise quantised int8.

    ``mu_dtype='int8'`` is ``Int8Momentum()``. Blocks run along each
    parameter's last axis; a last axis shorter than ``block_size`` is one
    block, and a last block that does not fill up is shorter.

    Attributes:
      block_size: values per float32 scale, along the last axis (default 32,
        as llm-foundry's 8-bit Lion; bitsandbytes uses 256). Smaller blocks
        track small values better and cost ``4 / block_size`` bytes per
        parameter; a tensor-parallel shard of the last axis should hold a
        whole number of blocks (32 divides the shards of every width that is
        a multiple of 256 over up to 8 devices).
      min_quantized_size: parameters with fewer elements (biases, norm
        scales), and scalars, keep a float32 momentum.

    Example:
      >>> import lion_optax
      >>> tx = lion_optax.lion(1e-4, mu_dtype=lion_optax.Int8Momentum(block_size=64))
    """

    block_size: int = 32
    min_quantized_size: int = 4096


def resolve_int8(mu_dtype: Any) -> Int8Momentum | None:
    """``mu_dtype`` as an :class:`Int8Momentum`, or None when it asks for a float dtype.

    ``'int8'`` and :class:`Int8Momentum` ask for block-wise quantised int8.
    The dtype ``jnp.int8`` itself is refused (with the other integer dtypes,
    by the float check) rather than read as that: plain int8 storage of a
    momentum would round every value below 1 to 0.

    Raises:
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
                f'{minimum}, e.g. Int8Momentum(block_size=32, min_quantized_size=4096).'
            )
    return spec


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


# ---------------------------------------------------------------------------
# Block-wise int8 quantisation along the last axis.


def block_length(last_axis: int, block_size: int) -> int:
    """The block length used for a last axis of ``last_axis`` elements."""
    return max(1, min(int(block_size), int(last_axis)))


def scales_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The shape of the per-block scales of an int8 array of ``shape``."""
    length = block_length(shape[-1], block_size)
    return (*shape[:-1], math.ceil(shape[-1] / length))


def _blocks(x: jax.Array, length: int) -> jax.Array:
    """``(..., n)`` -> ``(..., ceil(n / length), length)``, zero-padded at the end."""
    n = x.shape[-1]
    count = math.ceil(n / length)
    if count * length != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, count * length - n)])
    return x.reshape(*x.shape[:-1], count, length)


def _unblock(x: jax.Array, n: int) -> jax.Array:
    return x.reshape(*x.shape[:-2], -1)[..., :n]


def _absmax(blocks: jax.Array, *, variadic: bool) -> jax.Array:
    """``max(|x|)`` over the last axis, NaN if a block has one.

    ``variadic`` (XLA:CPU's form): one variadic (max, min) reduction instead
    of ``jnp.max(jnp.abs(x), -1)``: XLA:CPU hands the latter to a library
    kernel that cannot fuse the computation of ``x`` (the new momentum),
    which then makes a round trip through memory; the variadic one fuses it
    (measured 9x faster on 8M values). The GPU compiler does better with the
    plain form (19.75 instead of 20.25 bytes per parameter on H100).
    """
    if not variadic:
        return jnp.max(jnp.abs(blocks), axis=-1)
    init = (jnp.array(-jnp.inf, blocks.dtype), jnp.array(jnp.inf, blocks.dtype))
    high, low = jax.lax.reduce(
        (blocks, blocks),
        init,
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (blocks.ndim - 1,),
    )
    return jnp.maximum(high, -low)


# 127 / _SMALLEST_SCALE is still finite in float32 (1.7e38): a zero block (all
# its values 0) gets codes 0 without a select.
_SMALLEST_SCALE = np.float32(2.0**-120)


def block_maxima(x: jax.Array, block_size: int, *, cpu: bool = True) -> jax.Array:
    """``max |x|`` of each block along the last axis: the scales :func:`quantize_blockwise` uses."""
    blocks = _blocks(x.astype(jnp.float32), block_length(x.shape[-1], block_size))
    return _absmax(blocks, variadic=cpu)


def quantize_blockwise(
    x: jax.Array,
    block_size: int,
    bits: jax.Array | None = None,
    *,
    cpu: bool = True,
    scales: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Quantises ``x`` to int8 with one absmax scale per block along the last axis.

    .. math::

      s_b = \max_{j \in b} |x_j|, \qquad
      q_j = \mathrm{round}\bigl(127\, x_j / s_b\bigr) \in [-127, 127]

    With ``bits`` the rounding is stochastic (:math:`\mathbb{E}[q_j] = 127
    x_j / s_b`, so small values still move on average); without, to nearest.
    The error of an element is below :math:`s_b / 127` (stochastic) or
    :math:`s_b / 254` (nearest).

    Args:
      x: a float array with at least one dimension.
      block_size: values per block along the last axis (see :class:`Int8Momentum`).
      bits: optional uint32 random bits of ``x``'s shape
        (see :func:`lion_optax._src.rounding.random_bits`).
      cpu: write the block maximum in XLA:CPU's form (see ``_absmax``); the
        values are the same.
      scales: the block maxima of ``x`` when already computed
        (:func:`block_maxima`, in a pass of their own).

    Returns:
      ``(codes, scales)``: int8 codes of ``x``'s shape, float32 scales of
      :func:`scales_shape`.

    Example:
      >>> import jax.numpy as jnp
      >>> from lion_optax._src.momentum_storage import quantize_blockwise, dequantize_blockwise
      >>> codes, scales = quantize_blockwise(jnp.array([[0.5, -1.0, 0.25, 2.0]]), block_size=2)
      >>> codes.tolist(), scales.tolist()
      ([[64, -127, 16, 127]], [[1.0, 2.0]])
      >>> dequantize_blockwise(codes, scales, block_size=2).tolist()
      [[0.5039370059967041, -1.0, 0.25196850299835205, 2.0]]
    """
    n = x.shape[-1]
    length = block_length(n, block_size)
    blocks = _blocks(x.astype(jnp.float32), length)
    if scales is None:
        scales = _absmax(blocks, variadic=cpu)
    # A scale below 2**-120 (or 0) counts as 2**-120: 127 / scale stays finite
    # and a zero block gets zero codes, with no select (a select over the
    # blocks costs the GPU compiler a kernel of its own).
    inverse = 127.0 / jnp.maximum(scales, _SMALLEST_SCALE)
    scaled = _unblock(blocks * inverse[..., None], n)
    if bits is None:
        rounded = jnp.round(scaled)
    else:
        uniform = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        rounded = jnp.floor(scaled + uniform)
    codes = jnp.clip(rounded, -127.0, 127.0).astype(jnp.int8)
    return codes, scales


def dequantize_blockwise(codes: jax.Array, scales: jax.Array, block_size: int) -> jax.Array:
    """The float32 array that int8 ``codes`` with per-block ``scales`` stand for.

    Args:
      codes: int8 codes (the parameter's shape).
      scales: float32 per-block scales, of :func:`scales_shape` of the codes.
      block_size: the block size the codes were quantised with.

    Returns:
      A float32 array of ``codes``' shape.
    """
    n = codes.shape[-1]
    blocks = _blocks(codes.astype(jnp.float32), block_length(n, block_size))
    # codes * scale, then / 127 (as a product), element by element: a per-block
    # scale / 127 would be an array of its own, which the GPU compiler writes
    # and reads in a kernel of its own (0.25 bytes per parameter).
    return _unblock(blocks * scales[..., None] * np.float32(1.0 / 127.0), n)


# ---------------------------------------------------------------------------
# The storage of one momentum leaf.


class LeafStorage(NamedTuple):
    """How one momentum leaf is stored (static: decided from shapes and options).

    Attributes:
      dtype: the stored dtype: a float dtype, or int8 for block-wise codes.
      block_size: the quantisation block along the last axis (int8 only).
      stochastic: whether rounding into a lossy storage is stochastic.
    """

    dtype: Any
    block_size: int
    stochastic: bool

    @property
    def quantized(self) -> bool:
        """True for int8 codes with per-block scales."""
        return jnp.dtype(self.dtype) == jnp.int8

    @property
    def lossy(self) -> bool:
        """True when storing a float32 value may change it (so rounding matters)."""
        return self.quantized or rounding.is_narrower_float(self.dtype)

    @property
    def random(self) -> bool:
        """True when encoding draws random bits (stochastic rounding into a lossy storage)."""
        return self.stochastic and self.lossy


def storage_for(
    param: Any, mu_dtype: Any, *, stochastic: bool, compute_dtype: Any
) -> LeafStorage:
    """The storage of the momentum of ``param``.

    An :class:`Int8Momentum` quantises parameters of at least
    ``min_quantized_size`` elements (and one dimension) and keeps the others
    in ``compute_dtype``; a float ``mu_dtype`` is used as is; None follows the
    parameter.
    """
    if isinstance(mu_dtype, Int8Momentum):
        if np.ndim(param) >= 1 and 0 < np.size(param) and np.size(param) >= (
            mu_dtype.min_quantized_size
        ):
            return LeafStorage(jnp.dtype(jnp.int8), mu_dtype.block_size, stochastic)
        return LeafStorage(jnp.dtype(compute_dtype), 0, stochastic)
    dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else jnp.result_type(param)
    return LeafStorage(dtype, 0, stochastic)


def empty_scales(param: Any) -> jax.Array:
    """The zero-size scales of a leaf stored as float (so every leaf has scales)."""
    shape = jnp.shape(param)
    return jnp.zeros((*shape[:-1], 0), jnp.float32)


def zeros(storage: LeafStorage, param: Any, zeros_like: Any) -> tuple[Any, Any]:
    """Zero momentum for ``param``: ``(stored, scales)``.

    ``zeros_like(x, dtype)`` builds zeros of ``x``'s shape and sharding. The
    int8 scales are zeros like the first element of each block of ``param``
    (a view that takes the parameter's sharding), so they are sharded like the
    parameter too; the scales of a leaf stored as float are zero-size.
    """
    if storage.quantized:
        length = block_length(jnp.shape(param)[-1], storage.block_size)
        first_of_each_block = _blocks(jnp.asarray(param), length)[..., 0]
        return zeros_like(param, jnp.int8), zeros_like(first_of_each_block, jnp.float32)
    return zeros_like(param, storage.dtype), empty_scales(param)


def decode(storage: LeafStorage, stored: Any, scales: Any, dtype: Any) -> jax.Array:
    """The stored momentum as a ``dtype`` array."""
    if storage.quantized:
        return dequantize_blockwise(stored, scales, storage.block_size).astype(dtype)
    return stored.astype(dtype)


def encode(
    storage: LeafStorage,
    value: jax.Array,
    bits: jax.Array | None,
    *,
    cpu: bool = True,
    scales: jax.Array | None = None,
) -> tuple[Any, Any]:
    """Stores ``value`` (computed in float32 or wider): ``(stored, scales or None)``.

    ``bits`` (uint32, ``value``'s shape) are used when the storage is
    stochastic and lossy, and may be None otherwise. ``cpu`` picks XLA:CPU's
    form of the int8 block maximum (the values are the same).
    """
    if storage.quantized:
        return quantize_blockwise(
            value, storage.block_size, bits if storage.random else None, cpu=cpu, scales=scales
        )
    if storage.random:
        assert bits is not None, 'a stochastic, lossy storage needs random bits'
        return rounding.stochastic_round(value.astype(jnp.float32), storage.dtype, bits), None
    return value.astype(storage.dtype), None
