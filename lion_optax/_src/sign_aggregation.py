r"""Combining the workers' Lion directions: majority vote or average of packed signs.

Liu et al. (2024) observe that Lion's update is a sign, so data-parallel
workers need not all-reduce their gradients: each worker ``i`` keeps its own
momentum, computes its own Lion direction ``sign(c_i)`` from its local
gradient, and only these signs are combined:

.. math::

  \text{vote:}\ \Delta = \mathrm{sign}\Bigl(\sum_i \mathrm{sign}(c_i)\Bigr),
  \qquad
  \text{average:}\ \Delta = \frac{1}{N}\sum_i \mathrm{sign}(c_i).

Here this is the optax transformation :func:`aggregate_signs`, run inside
``jax.shard_map`` over the data axis (``distributed_lion`` chains it).

How the signs travel (per device, for ``P`` parameters and ``N`` workers):

1. Each sign is a ternary digit (``sign(0) = 0`` is kept exact); 20 of them
   are packed into one ``uint32`` (``3**20 < 2**32``): 1.6 bits per
   parameter. A 1-bit code would send 37% less but would have to move
   every coordinate whose direction is exactly 0 (an embedding row that
   never gets a gradient, a masked parameter), which plain Lion leaves still.
   Each leaf is packed on its own, in whole words (at most 19 signs of
   padding a leaf), so no flat copy of all the signs is made.
2. An ``all_to_all`` sends worker ``j`` the ``j``-th ``1/N`` slice of
   every worker's packed words: ``(N-1)/N * 0.2 P`` bytes sent per device.
3. Each worker counts the votes of its slice (exact integers in ``[-N, N]``)
   and packs the result: the vote again as ternary digits (1.6 bits), the
   average as digits of base ``2N+1`` (``floor(32 / log2(2N+1))`` per word,
   4.6 bits for ``N = 8``, 10.7 bits for ``N = 256``).
4. An ``all_gather`` of the packed results: ``(N-1)/N`` of their size.

Per-device traffic is therefore flat in ``N`` for the vote: ``(N-1)/N * 0.4 P``
bytes against ``(N-1)/N * 8 P`` for a float32 ring all-reduce, 1/20 at any
``N``. The average grows only like ``log N``, since the result itself needs
``log2(2N+1)`` bits: 1/10.4 of the all-reduce at ``N = 8``, 1/5.2 at
``N = 256``. Gathering every worker's 1-bit signs instead (an ``all_gather``)
costs ``(N-1) P / 8`` bytes per device: 1/8 of the all-reduce at ``N = 8``
but 4x more than it at ``N = 256``. :func:`~lion_optax.hlo.sign_layout` gives the exact
numbers (padding included) for any model and ``N``.
"""

import math
import typing
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import validation
from lion_optax._src.sharding import is_manual, is_varying

Method = Literal['vote', 'average']
METHODS: tuple[str, ...] = typing.get_args(Method)

# ---------------------------------------------------------------------------
# Packing small integers into uint32 words.


def digits_per_word(base: int, bits: int = 32) -> int:
    """How many digits of ``base`` fit in one word of ``bits`` bits (``base**k <= 2**bits``)."""
    k = 0
    while base ** (k + 1) <= 2**bits:
        k += 1
    return k


def pack_digit_planes(digits: jax.Array, base: int) -> jax.Array:
    """Packs ``digits`` of shape ``(..., count, W)`` (values in ``[0, base)``) into uint32.

    Word ``k`` is ``sum_j digits[..., j, k] * base**j``, with ``count`` at most
    :func:`digits_per_word`, so the packed value never overflows.
    """
    count = digits.shape[-2]
    weights = jnp.asarray([base**j for j in range(count)], jnp.uint32)[:, None]
    weights = weights.reshape((1,) * (digits.ndim - 2) + weights.shape)  # explicit rank
    return jnp.sum(digits.astype(jnp.uint32) * weights, axis=-2, dtype=jnp.uint32)


def unpack_digit_planes(words: jax.Array, base: int, count: int) -> jax.Array:
    """Inverse of :func:`pack_digit_planes`: ``(..., W)`` words -> ``(..., count, W)`` digits.

    The digits are uint8 (uint16 for a base above 256). Why not ``count``
    integer divisions of each word: on the CPU a uint32 division by a
    constant vectorises poorly (it needs a 64-bit product), and XLA puts each
    digit's chain of divisions in a kernel of its own (about 40 per step).
    Here one division splits each word into 16-bit parts (``3**10 < 2**16``:
    two parts of 10 ternary digits), and the digits of a part ``h < 2**16``
    come from float32 arithmetic in one broadcast kernel:
    ``q_j = floor((h + 1/2) / base**j)`` is exact (the rounding error,
    below ``2**16 * 2**-23 / base**j``, is smaller than the distance
    ``1 / (2 base**j)`` of ``(h + 1/2) / base**j`` to an integer), and
    ``digit_j = q_j - base * floor((q_j + 1/2) / base)``.
    """
    parts = _parts(words, base, count)
    if parts is None:  # base > 2**16: a word holds one digit
        return words[..., None, :]
    dtype = jnp.uint8 if base <= 256 else jnp.uint16
    planes = []
    for part, size in parts:
        h = part.astype(jnp.float32)[..., None, :] + 0.5
        inverse = jnp.asarray([float(base) ** -j for j in range(size)], jnp.float32)[:, None]
        inverse = inverse.reshape((1,) * (h.ndim - 2) + inverse.shape)  # explicit rank
        q = jnp.floor(h * inverse)
        planes.append((q - base * jnp.floor((q + 0.5) * (1.0 / base))).astype(dtype))
    return planes[0] if len(planes) == 1 else jnp.concatenate(planes, axis=-2)


def _parts(words: jax.Array, base: int, count: int) -> list[tuple[jax.Array, int]] | None:
    """``words`` split into parts below ``2**16`` (one integer division per part boundary).

    Returns ``(part, digits in it)`` pairs, lowest digits first, or None when
    a digit does not fit 16 bits (then a word holds one digit).
    """
    per_part = digits_per_word(base, 16)
    if per_part == 0:
        return None
    sizes = [per_part] * (count // per_part) + ([count % per_part] if count % per_part else [])
    parts, rest = [], words.astype(jnp.uint32)
    for i, size in enumerate(sizes):
        if i == len(sizes) - 1:
            parts.append((rest, size))
        else:
            high = rest // jnp.uint32(base**size)
            parts.append((rest - high * jnp.uint32(base**size), size))
            rest = high
    return parts


def _digit(half: jax.Array, base: int, j: int) -> jax.Array:
    """Digit ``j`` of a part as float32, from ``half = part + 1/2`` (see unpack_digit_planes)."""
    q = jnp.floor(half * (float(base) ** -j))
    return q - base * jnp.floor((q + 0.5) * (1.0 / base))


def pack_digits(digits: jax.Array, base: int) -> jax.Array:
    """Packs the last axis of ``digits`` (values in ``[0, base)``) into one uint32.

    Digit ``j`` has weight ``base**j``; the last axis must be at most
    :func:`digits_per_word` long, so the packed value never overflows.
    """
    return pack_digit_planes(digits[..., None], base)[..., 0]


def unpack_digits(words: jax.Array, base: int, count: int) -> jax.Array:
    """Inverse of :func:`pack_digits`: a new last axis of ``count`` uint32 digits."""
    planes = unpack_digit_planes(words[..., None], base, count)
    return jnp.swapaxes(planes, -1, -2)[..., 0, :].astype(jnp.uint32)


# ---------------------------------------------------------------------------
# The aggregation.


class SignLayout(NamedTuple):
    """How :func:`~lion_optax.aggregate_signs` lays ``num_params`` signs out for ``num_workers``.

    Attributes:
      num_params: signs per worker (the parameters' total size).
      num_workers: the size of the data axis.
      method: ``'vote'`` or ``'average'``.
      shard_digits: signs in each worker's slice (padded).
      in_base, in_per_word: digit base and digits per uint32 of the signs sent.
      out_base, out_per_word: the same for the aggregated result.
    """

    num_params: int
    num_workers: int
    method: str
    shard_digits: int
    in_base: int
    in_per_word: int
    out_base: int
    out_per_word: int

    @property
    def bytes_sent_per_device(self) -> float:
        """Bytes one device sends per step (all_to_all + all_gather), ring model."""
        n = self.num_workers
        words = (
            n * self.shard_digits // self.in_per_word + n * self.shard_digits // self.out_per_word
        )
        return (n - 1) / n * 4.0 * words

    @property
    def fp32_allreduce_bytes(self) -> float:
        """Bytes one device sends in a float32 ring all-reduce of the same parameters."""
        n = self.num_workers
        return 2.0 * (n - 1) / n * 4.0 * self.num_params


def _leaf_words(sizes: Sequence[int], per_word: int) -> list[int]:
    """Words per leaf: each leaf is packed on its own, in whole words."""
    return [-(-size // per_word) for size in sizes]


def sign_layout(
    num_params: int | Sequence[int], num_workers: int, method: Method = 'vote'
) -> SignLayout:
    """The packing and traffic of :func:`~lion_optax.aggregate_signs` for a model and a worker count.

    Args:
      num_params: the parameters' total number of elements, or the sizes of
        their leaves (each leaf is packed in whole words of 20 signs, so the
        leaves give the exact padding; at most 19 signs a leaf).
      num_workers: the size of the data axis.
      method: ``'vote'`` or ``'average'``.

    Returns:
      A :class:`SignLayout`, whose ``bytes_sent_per_device`` and
      ``fp32_allreduce_bytes`` give the traffic analysis for any scale.

    Example:
      >>> from lion_optax.hlo import sign_layout
      >>> layout = sign_layout(10**9, 256, 'vote')
      >>> round(layout.fp32_allreduce_bytes / layout.bytes_sent_per_device, 1)
      20.0
    """
    validation.check_choice('method', method, METHODS)
    sizes = [num_params] if isinstance(num_params, int) else list(num_params)
    if not sizes or any(not isinstance(v, int) or v < 0 for v in sizes) or sum(sizes) < 1:
        raise ValueError(
            f'num_params must be a positive int or a sequence of leaf sizes (ints >= 0, '
            f'at least one element in all), got {num_params!r}.'
        )
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f'num_workers must be a positive int, got {num_workers!r}.')
    in_base = 3
    out_base = 3 if method == 'vote' else 2 * num_workers + 1
    in_per_word, out_per_word = digits_per_word(in_base), digits_per_word(out_base)
    # Every worker's slice of the words holds a whole number of result words.
    unit = math.lcm(in_per_word, out_per_word) // in_per_word
    words = sum(_leaf_words(sizes, in_per_word))
    shard = -(-words // (num_workers * unit)) * unit * in_per_word
    return SignLayout(
        sum(sizes), num_workers, method, shard, in_base, in_per_word, out_base, out_per_word
    )


def _ternary(u: jax.Array) -> jax.Array:
    """``sign(u)`` as int8, with NaN -> 0 (a worker with a NaN abstains)."""
    return jnp.where(u > 0, 1, jnp.where(u < 0, -1, 0)).astype(jnp.int8)


def _pack_leaf(update: jax.Array, per_word: int) -> jax.Array:
    """One leaf's signs as ternary digits packed into words (``(words,)`` uint32).

    Word ``k`` holds the leaf's elements ``k, k + W, k + 2W, ...`` (``W``
    words): packing reads whole contiguous planes of the leaf, and no flat
    copy of all the leaves' signs is ever made.
    """
    size = math.prod(jnp.shape(update))
    words = -(-size // per_word)
    digits = (_ternary(update).reshape(-1) + 1).astype(jnp.uint8)
    planes = jnp.pad(digits, (0, per_word * words - size)).reshape(per_word, words)
    word = jnp.zeros((words,), jnp.uint32)
    for j in reversed(range(per_word)):  # Horner: one loop over the words, no reduction
        word = word * jnp.uint32(3) + planes[j].astype(jnp.uint32)
    return word


def _count(received: jax.Array, layout: SignLayout) -> jax.Array:
    """The packed results of one worker's slice from every worker's packed signs.

    ``received`` is ``(N, words)``. The vote (its result has the signs'
    format) is counted and packed digit by digit in one loop over the words:
    no array of digits is made, and no reduction over a digit axis, which
    XLA:CPU does not vectorise. The average's results have another base, so
    they are laid out first, as ``(digit j, word k)`` in order.
    """
    n = layout.num_workers
    parts = _parts(received, layout.in_base, layout.in_per_word)
    assert parts is not None  # base 3
    if layout.method == 'vote' and n <= 16:
        word = jnp.zeros(received.shape[1:], jnp.uint32)
        weight = 1
        for part, size in parts:
            half = part.astype(jnp.float32) + 0.5
            for j in range(size):
                digits = _digit(half, layout.in_base, j)  # sign + 1 of every worker
                total = sum(digits[i] for i in range(n))  # exact small integers
                vote = (jnp.sign(total - n) + 1).astype(jnp.uint32)
                word = word + vote * jnp.uint32(weight)
                weight *= layout.in_base
        return word
    digits = unpack_digit_planes(received, layout.in_base, layout.in_per_word)
    totals = jnp.sum(digits.astype(jnp.int32), axis=0)  # (in_per_word, words) in [0, 2N]
    result = jnp.sign(totals - n) + 1 if layout.method == 'vote' else totals
    return pack_digit_planes(result.reshape(layout.out_per_word, -1), layout.out_base)


def _combine(words: jax.Array, total: int, axis_name: str, layout: SignLayout) -> jax.Array:
    """The two collectives: every leaf's packed signs -> the aggregated digits.

    ``words`` (all leaves' words, then padding: ``(N * shard_digits / 20,)``)
    is cut into one slice per worker; each worker sums the digits of its
    slice from every worker (the sum of ``sign + 1``, in ``[0, 2N]``) and
    packs the result (the vote or the sum itself) for the ``all_gather``.
    Returns the result digits as ``(in_per_word, total)``: column ``g``
    holds the digits of word ``g``.
    """
    n = layout.num_workers
    chunk = layout.shard_digits // layout.in_per_word
    manual = is_manual(axis_name)
    words = words.reshape(n, chunk)
    if manual and not is_varying(words, axis_name):
        words = jax.lax.pcast(words, axis_name, to='varying')
    # Row j of `received` holds worker j's signs for this worker's slice.
    received = jax.lax.all_to_all(words, axis_name, 0, 0, tiled=True)
    gathered = jax.lax.all_gather(
        _count(received, layout), axis_name, tiled=True, to='invarying' if manual else 'varying'
    ).reshape(n, -1)
    values = unpack_digit_planes(gathered, layout.out_base, layout.out_per_word)
    values = values.reshape(n, layout.in_per_word, chunk).transpose(1, 0, 2)
    return values.reshape(layout.in_per_word, n * chunk)[:, :total]


def aggregate_signs(
    axis_name: str = 'data', *, method: Method = 'vote'
) -> optax.GradientTransformation:
    r"""Combines the workers' sign directions by majority vote or by averaging.

    Place it right after :func:`scale_by_lion` (whose per-worker output is
    :math:`\mathrm{sign}(c_i)`) and before weight decay and the learning
    rate, inside ``jax.shard_map`` (or ``jax.vmap``) over ``axis_name``:

    .. math::

      \text{vote:}\ \Delta = \mathrm{sign}\Bigl(\sum_{i=1}^N s_i\Bigr),
      \qquad
      \text{average:}\ \Delta = \frac{1}{N}\sum_{i=1}^N s_i,
      \qquad s_i = \mathrm{sign}(u_i) \in \{-1, 0, 1\}.

    The input is reduced to its sign (NaN counts as 0: that worker abstains),
    so anything but a sign direction loses information here. Ties in the vote
    (as many +1 as -1, possible with an even ``N`` or abstentions) give 0: no
    step on that coordinate except weight decay, the ``sign(0) = 0``
    convention of every Lion implementation. The result is identical on every
    worker (typed invariant over ``axis_name`` inside ``shard_map``), in each
    update's dtype.

    Communication, per step and device: the signs as packed ternary digits
    (1.6 bits each) in one ``all_to_all``, and the aggregated values packed
    (1.6 bits for the vote, ``log2(2N+1)`` rounded to fit a uint32 word for
    the average) in one ``all_gather``; see :func:`~lion_optax.hlo.sign_layout` for the
    bytes. All leaves travel together in one pair of collectives.

    Args:
      axis_name: the data axis (a ``shard_map`` mesh axis or ``vmap`` axis name).
      method: ``'vote'`` (majority vote) or ``'average'`` (mean of signs).

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.aggregate_signs('workers', method='vote')
      >>> def combine(u):  # one worker's direction
      ...   return tx.update(u, tx.init(u))[0]
      >>> directions = jnp.array([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, 0.0]])
      >>> jax.vmap(combine, axis_name='workers')(directions)[0]
      Array([1., 1., 0.], dtype=float32)

    References:
      Liu et al., `Communication Efficient Distributed Training with
      Distributed Lion <https://arxiv.org/abs/2404.00438>`_, 2024.
    """
    if not isinstance(axis_name, str):
        raise TypeError(
            f'axis_name must be the name of one axis (a str), got {axis_name!r}. '
            'Flatten several data axes into one mesh axis for Distributed Lion.'
        )
    validation.check_choice('method', method, METHODS)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
        if sum(sizes) == 0:
            return updates, state
        layout = sign_layout(sizes, jax.lax.axis_size(axis_name), method)
        per_word = layout.in_per_word
        # Every leaf's words written in place into one buffer (a concatenation
        # would make XLA:CPU choose the operand of every element in one loop).
        counts = _leaf_words(sizes, per_word)
        words = jnp.zeros((layout.num_workers * layout.shard_digits // per_word,), jnp.uint32)
        if is_manual(axis_name):
            words = jax.lax.pcast(words, axis_name, to='varying')
        start = 0
        for leaf, count in zip(leaves, counts):
            if count:
                words = jax.lax.dynamic_update_slice(words, _pack_leaf(leaf, per_word), (start,))
            start += count
        digits = _combine(words, start, axis_name, layout)
        offset = 1 if method == 'vote' else layout.num_workers
        out, start = [], 0
        for leaf, size, count in zip(leaves, sizes, counts):
            part = digits[:, start : start + count].reshape(-1)[:size]
            start += count
            part = part.astype(jnp.int32).reshape(jnp.shape(leaf)) - offset
            if method == 'vote':
                out.append(part.astype(leaf.dtype))
            else:
                out.append((part.astype(jnp.float32) / layout.num_workers).astype(leaf.dtype))
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


