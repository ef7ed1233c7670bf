"""Compiling for accelerators this machine does not have, ahead of time (tests and benchmarks).

XLA compiles for a TPU topology through libtpu and for a GPU through the CUDA
plugin given a description of the device, on a CPU-only machine: nothing runs,
but the compiled program is what that accelerator would run, so its kernels,
memory traffic (:func:`memory_traffic`) and temporaries can be read. The
compilers come with the ``accelerators`` extra (``pip install
"lion_optax[accelerators]"``: ``jax[tpu]`` and ``jax[cuda12]``).
"""

import os
import typing
import warnings
from typing import Any, Literal

TPU_TOPOLOGIES = {'tpu v5e': 'v5e:2x2', 'tpu v5p': 'v5p:2x2x1', 'tpu v4': 'v4:2x2x1'}
Target = Literal['tpu v5e', 'tpu v5p', 'tpu v4', 'gpu h100']
TARGETS: tuple[str, ...] = typing.get_args(Target)

# An NVIDIA H100 80GB HBM3 (SXM): 132 SMs, compute capability 9.0, 3.35 TB/s,
# as the CUDA plugin's compiler reads a GPU's description (a GpuTargetConfig).
_H100 = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _environment() -> None:
    # Several processes (test workers) may load libtpu at once; no CUDA driver is
    # here to check the plugin against; the TPU type only silences libtpu's probe.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')


def unavailable(target: str) -> str | None:
    """Why this machine cannot compile for ``target``, or None when it can.

    Example:
      >>> from lion_optax.hlo import unavailable
      >>> unavailable('tpu v9')
      "unknown target 'tpu v9': expected one of 'tpu v5e', 'tpu v5p', 'tpu v4', 'gpu h100'"
    """
    if target not in TARGETS:
        known = ', '.join(repr(t) for t in TARGETS)
        return f'unknown target {target!r}: expected one of {known}'
    package = 'libtpu' if target.startswith('tpu') else 'jax_plugins.xla_cuda12'
    try:
        __import__(package)
    except ImportError:
        return (
            f'no {target.split()[0].upper()} compiler here ({package} is not installed): '
            'pip install "lion_optax[accelerators]"'
        )
    return None


def target_devices(target: Target) -> list[Any]:
    """The devices of ``target`` (4 TPU chips, or one H100), to compile for ahead of time.

    Use them in a ``jax.sharding.Mesh`` and give ``jax.jit(...).lower`` abstract
    arguments (``jax.ShapeDtypeStruct``) sharded over it; ``.compile()`` then
    runs that accelerator's compiler.

    Args:
      target: ``'tpu v5e'`` (a 2x2 topology), ``'tpu v5p'`` (2x2x1), ``'tpu v4'``
        (2x2x1) or ``'gpu h100'``.

    Returns:
      A list of devices (not usable for running anything).

    Raises:
      RuntimeError: when the compiler is not installed (see :func:`unavailable`).

    Example:
      >>> from lion_optax import hlo
      >>> if hlo.unavailable('tpu v5e') is None:
      ...     assert len(hlo.target_devices('tpu v5e')) == 4
    """
    reason = unavailable(target)
    if reason is not None:
        raise RuntimeError(f'cannot compile for {target}: {reason}')
    _environment()
    from jax.experimental import topologies  # noqa: PLC0415  (only when compiling ahead of time)

    if target in TPU_TOPOLOGIES:
        topology = topologies.get_topology_desc(
            platform='tpu', topology_name=TPU_TOPOLOGIES[target]
        )
    else:
        topology = topologies.get_topology_desc(
            platform='cuda', target_config=_H100, topology='1x1x1'
        )
    return list(topology.devices)


def compile_step(
    transformation: Any,
    params: Any,
    target: Target,
    *,
    axis_types: Literal['explicit', 'auto'] = 'explicit',
) -> Any:
    """Compiles ``update`` + ``optax.apply_updates`` (donated, jitted) for ``target``, ahead of time.

    Each parameter (and state array) of at least one dimension whose first axis
    the devices divide is sharded along it (FSDP over a ``'data'`` mesh axis of
    all the target's devices); the rest is replicated.

    Args:
      transformation: an optax transformation (e.g. ``lion_optax.lion(1e-4)``).
      params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes and
        dtypes are used; nothing is allocated).
      target: see :func:`target_devices`.
      axis_types: the mesh's axis type: ``'explicit'`` (``jax.make_mesh``'s
        default, the placement known while tracing) or ``'auto'``.

    Returns:
      The compiled program (``jax.stages.Compiled``), to read with
      :func:`memory_traffic`, ``.memory_analysis()`` or ``.as_text()``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lion_optax
      >>> from lion_optax import hlo
      >>> if hlo.unavailable('gpu h100') is None:
      ...     compiled = hlo.compile_step(lion_optax.lion(1e-4), {'w': jnp.zeros((1024, 1024))},
      ...                                 'gpu h100')
      ...     assert hlo.memory_traffic(compiled).kernels == 1
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    devices = target_devices(target)
    kind = AxisType.Explicit if axis_types == 'explicit' else AxisType.Auto
    mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices)), ('data',), axis_types=(kind,))

    def placed(x: Any) -> Any:
        shape = tuple(x.shape)
        split = bool(shape) and shape[0] % len(devices) == 0
        spec = P('data', *([None] * (len(shape) - 1))) if split else P()
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, spec))

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_params = jax.tree.map(placed, shapes)
    abstract_state = jax.tree.map(placed, jax.eval_shape(transformation.init, shapes))

    def step(params: Any, state: Any, grads: Any) -> Any:
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    from jax._src import config  # noqa: PLC0415

    # A persistent compilation cache cannot give back programs for devices this
    # process has no client for: JAX warns that it could not read the entry and
    # compiles. Turn the cache off (effective until it was first used) and drop
    # that warning (JAX then compiles, which is what is asked for here).
    with jax.set_mesh(mesh), config.enable_compilation_cache(False), warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Error reading persistent compilation cache')
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
            abstract_params, abstract_state, abstract_params
        )
        return lowered.compile()
