r"""int8 momentum on TPU: one Pallas kernel per parameter.

int8 momentum (:class:`Int8Momentum`) stores codes in the parameter's shape and
one scale per block of 32 values along the last axis. Its step needs a
reduction before it can write (each block's new maximum), and XLA's TPU
compiler handles reductions and broadcasts over small windows of the minor
(lane) dimension badly: it transposes whole arrays in memory (82-92 bytes per
parameter on TPU v5e/v5p where the ideal is 14.25). This kernel does the
parameter's whole momentum step in on-chip memory instead, reading the
gradient, the codes and the scales once and writing the new codes, the new
scales and the direction :math:`\mathrm{sign}(c_t)` as int8 (1 byte): with the
weight decay, learning rate and ``apply_updates`` that XLA fuses after it,
about 16.4 bytes per parameter.

Inside, each tile of rows is transposed so that a block of 32 values lies
along sublanes: the block maximum is then an element-wise maximum of vector
registers and a sublane reduction, and broadcasting a scale back over its
block is a sublane broadcast. The arithmetic is :func:`lion_leaf_step`'s in the
same order, so the results are the XLA formulation's (checked bit for bit in
Pallas' interpret mode on CPU, tests/test_int8_kernel.py).

It is used for two-dimensional parameters stored as int8 with the ``sign``
kappa (cautious or not), whose blocks and tiles fit (:func:`applies`), when
the parameter's placement is known while tracing: one device, an Explicit
mesh (``jax.make_mesh``'s default; the kernel then runs per shard in a
``shard_map``), or inside ``shard_map``. On a multi-device mesh with Auto axes
the placement is only decided later by XLA, and the XLA formulation is used.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from lion_optax._src import momentum_storage, validation
from lion_optax._src.numerics import compute_dtype

_SIGN_DTYPE = jnp.int8  # the direction as it leaves the kernel (see int8_leaf_step)
_TILE_ROWS = 128  # lanes of the transposed tile: one full vector register row
_COLUMN_TILES = (1024, 512, 256)  # columns per tile when the last axis is long
_MAX_FULL_WIDTH = 2048  # a last axis up to this is one tile wide


def _column_tile(columns: int, block: int) -> int | None:
    """Columns per tile for a last axis of ``columns``, or None when none fits."""
    if columns % block:
        return None
    for tile in _COLUMN_TILES:
        if columns % tile == 0 and (tile // block) % 8 == 0:
            return tile
    return columns if columns <= _MAX_FULL_WIDTH else None


def _placement(x: Any) -> tuple[Any, P] | None:
    """``(mesh, spec)`` of ``x`` when known while tracing (mesh None: one device / manual)."""
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    if sharding is None or mesh is None or mesh.empty:
        return None, P()
    types = set(mesh.axis_types)
    if types == {AxisType.Manual}:
        return None, P()  # inside shard_map: x is this worker's shard
    if types == {AxisType.Explicit}:
        return mesh, sharding.spec
    return None  # Auto (or mixed) axes: XLA decides the placement later


def _local_shape(shape: tuple[int, ...], mesh: Any, spec: P) -> tuple[int, ...] | None:
    if mesh is None:
        return shape
    local = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        count = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if size % count:
            return None
        local.append(size // count)
    return tuple(local)


def applies(
    g: Any, storage: momentum_storage.LeafStorage, *, sign: bool, nonfinite: str
) -> bool:
    """Whether this parameter's TPU step uses the kernel (decided while tracing).

    ``nonfinite='propagate'`` keeps the XLA formulation: the kernel's int8
    direction cannot carry a NaN into the parameters.
    """
    if not sign or nonfinite != 'zero' or not storage.quantized or jnp.ndim(g) != 2:
        return False
    if not jnp.issubdtype(jnp.result_type(g), jnp.floating) or jnp.dtype(jnp.result_type(g)).itemsize > 4:
        return False
    block = storage.block_size
    if block % 8 or block > 1024:
        return False
    placement = _placement(g)
    if placement is None:
        return False
    local = _local_shape(tuple(jnp.shape(g)), *placement)
    return (
        local is not None
        and local[0] >= _TILE_ROWS
        and _column_tile(local[1], block) is not None
    )


@functools.cache
def _kernel(
    block: int,
    nonfinite_zero: bool,
    stochastic: bool,
    rows: int,
    columns: int,
    betas: tuple[float, float] | None,
):
    """The kernel body for one (rows x columns) tile, in the transposed domain.

    ``betas``: Python-float ``(b1, b2)`` are compiled into the kernel as the XLA
    formulation compiles them (constants); None reads them from SMEM (traced
    values, e.g. from ``optax.inject_hyperparams``).
    """
    blocks = columns // block

    def expand(per_block: jax.Array) -> jax.Array:
        # (blocks, rows) -> (columns, rows): each block's value on its 32 sublanes.
        return jnp.broadcast_to(per_block[:, None, :], (blocks, block, rows)).reshape(columns, rows)

    def kernel(coef_ref, word_ref, g_ref, codes_ref, scales_ref, codes_out, scales_out, sign_out):
        from jax.experimental import pallas as pl  # noqa: PLC0415

        if betas is None:
            one_minus_b1, b1, one_minus_b2, b2 = coef_ref[0], coef_ref[1], coef_ref[2], coef_ref[3]
        else:
            b1, b2 = betas
            one_minus_b1, one_minus_b2 = 1.0 - b1, 1.0 - b2
        word = lax.bitcast_convert_type(word_ref[0], jnp.uint32)
        valid = word_ref[1] != 0
        # The element's index on the parameter's last axis (as rounding.random_bits
        # counts it): this shard's first column, this tile's, then the row.
        first_column = lax.bitcast_convert_type(word_ref[2], jnp.uint32) + (
            pl.program_id(1) * columns
        ).astype(jnp.uint32)
        g = g_ref[...].astype(jnp.float32).T  # (columns, rows)
        if nonfinite_zero:
            g = jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g))
        # As dequantize_blockwise: codes * scale * (1 / 127), in that order.
        old_codes = codes_ref[...].astype(jnp.float32).T
        m_old = old_codes * expand(scales_ref[...]) * np.float32(1.0 / 127.0)
        c = one_minus_b1 * g + b1 * m_old
        m_new = one_minus_b2 * g + b2 * m_old
        m_new = jnp.where(valid, m_new, m_old)
        scales = jnp.max(jnp.abs(m_new.reshape(blocks, block, rows)), axis=1)
        inverse = 127.0 / jnp.maximum(scales, np.float32(2.0**-120))
        scaled = m_new * expand(inverse)
        if stochastic:
            index = lax.broadcasted_iota(jnp.uint32, (columns, rows), 0) + first_column
            bits = (index + lax.bitcast_convert_type(g, jnp.uint32)) * np.uint32(0x9E3779B9) + word
            rounded = jnp.floor(scaled + (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24))
        else:
            rounded = jnp.round(scaled)
        # A step that must not happen keeps the codes and scales bit for bit
        # (re-encoding the kept momentum would round them again). The select is
        # on float32 values: Mosaic has no int8 vector select.
        codes = jnp.where(valid, jnp.clip(rounded, -127.0, 127.0), old_codes)
        codes_out[...] = codes.T.astype(jnp.int8)
        scales_out[...] = jnp.where(valid, scales, scales_ref[...])
        # sign(c) as int8 (c is finite here: non-finite gradients are zeroed).
        # Written with selects: Pallas' lowering of sign asks the local device
        # for its TPU generation, which an ahead-of-time compile does not have.
        sign = jnp.where(c > 0, 1.0, jnp.where(c < 0, -1.0, 0.0))
        sign_out[...] = sign.T.astype(sign_out.dtype)

    return kernel


def _call(
    g: jax.Array,
    codes: jax.Array,
    scales_t: jax.Array,
    coefficients: jax.Array,
    word_and_valid: jax.Array,
    *,
    block: int,
    nonfinite_zero: bool,
    stochastic: bool,
    betas: tuple[float, float] | None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pallas_call on one device's (rows, columns) arrays; scales transposed."""
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    rows, columns = g.shape
    tile = _column_tile(columns, block)
    assert tile is not None and rows >= _TILE_ROWS
    tile_rows = _TILE_ROWS
    grid = (pl.cdiv(rows, tile_rows), columns // tile)
    tile_blocks = tile // block
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.pallas_call(
        _kernel(block, nonfinite_zero, stochastic, tile_rows, tile, betas),
        grid=grid,
        in_specs=[
            smem,
            smem,
            pl.BlockSpec((tile_rows, tile), lambda i, j: (i, j)),
            pl.BlockSpec((tile_rows, tile), lambda i, j: (i, j)),
            pl.BlockSpec((tile_blocks, tile_rows), lambda i, j: (j, i)),
        ],
        out_specs=[
            pl.BlockSpec((tile_rows, tile), lambda i, j: (i, j)),
            pl.BlockSpec((tile_blocks, tile_rows), lambda i, j: (j, i)),
            pl.BlockSpec((tile_rows, tile), lambda i, j: (i, j)),
        ],
        # Inside shard_map the outputs vary over the mesh axes as the gradient does.
        out_shape=[
            jax.ShapeDtypeStruct(codes.shape, jnp.int8, manual_axis_type=jax.typeof(g).mat),
            jax.ShapeDtypeStruct(scales_t.shape, jnp.float32, manual_axis_type=jax.typeof(g).mat),
            jax.ShapeDtypeStruct(codes.shape, _SIGN_DTYPE, manual_axis_type=jax.typeof(g).mat),
        ],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), allow_input_fusion=None
        ),
        interpret=interpret,
        name='lion_int8_momentum_step',
    )(coefficients, word_and_valid, g, codes, scales_t)


def int8_leaf_step(
    g: jax.Array,
    stored: jax.Array,
    scales: jax.Array,
    word: jax.Array,
    step_is_valid: jax.Array | None,
    *,
    b1: Any,
    b2: Any,
    storage: momentum_storage.LeafStorage,
    nonfinite: str,
    interpret: bool = False,
) -> Any:
    """:func:`lion_leaf_step` for an int8 leaf, as the TPU kernel (a ``LeafStep``).

    Its ``interpolation`` is :math:`\\mathrm{sign}(c_t)` (int8, converted to
    float where it is used), which is all the sign kappa and Cautious Lion
    read of :math:`c_t`.
    """
    from lion_optax._src.direction import LeafStep  # noqa: PLC0415  (direction imports this module)


    dtype = compute_dtype(g)
    constants = validation.concrete_float(b1), validation.concrete_float(b2)
    betas = None if None in constants else (float(b1), float(b2))
    coefficients = jnp.stack(
        [jnp.asarray(v, jnp.float32) for v in (1.0 - b1, b1, 1.0 - b2, b2)]
    )
    valid = jnp.array(True) if step_is_valid is None else step_is_valid
    word_bits = lax.bitcast_convert_type(jnp.asarray(word, jnp.uint32), jnp.int32)
    kernel_call = functools.partial(
        _call,
        block=storage.block_size,
        nonfinite_zero=nonfinite == 'zero',
        stochastic=storage.random,
        betas=betas,
        interpret=interpret,
    )
    placement = _placement(g)
    assert placement is not None
    mesh, spec = placement
    spec = P(*(tuple(spec) + (None,) * (2 - len(spec))))

    def call(g, stored, scales_t, coefficients, word_bits, valid):
        # The first column of this shard on the parameter's last axis.
        first = jnp.zeros([], jnp.int32)
        if mesh is not None and spec[1] is not None:
            first = (jax.lax.axis_index(spec[1]) * g.shape[1]).astype(jnp.int32)
        word_and_valid = jnp.stack([word_bits, valid.astype(jnp.int32), first])
        return kernel_call(g, stored, scales_t, coefficients, word_and_valid)

    if mesh is not None:
        transposed = P(spec[1], spec[0])
        call = jax.shard_map(
            call,
            mesh=mesh,
            in_specs=(spec, spec, transposed, P(), P(), P()),
            out_specs=(spec, transposed, spec),
        )
    codes, new_scales_t, direction = call(g, stored, scales.T, coefficients, word_bits, valid)
    zeroed = jnp.asarray(g).astype(dtype)
    if nonfinite == 'zero':
        zeroed = jnp.where(jnp.isfinite(zeroed), zeroed, jnp.zeros_like(zeroed))
    return LeafStep(direction.astype(dtype), zeroed, codes, new_scales_t.T)
