"""Reading compiled programs: collectives, memory traffic, bytes per device.

For tests and benchmarks: how much a compiled step communicates
(:func:`hlo_collectives`, :func:`bytes_sent_per_device`), how many bytes its
kernels move through main memory and how many kernels it launches
(:func:`memory_traffic`, on any compiler), and how much memory a state takes
per device (:func:`tree_bytes`). :func:`compile_step` compiles a step ahead of
time for a TPU or GPU this machine does not have (:data:`TARGETS`,
:func:`target_devices`; the compilers come with the ``accelerators`` extra,
:func:`unavailable` says why one is missing).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lion_optax import hlo
  >>> hlo.hlo_collectives(jax.jit(jnp.sin).lower(jnp.ones(3)).compile())
  []
"""

from lion_optax._src.aot import TARGETS, compile_step, target_devices, unavailable
from lion_optax._src.hlo import Collective, bytes_sent_per_device, hlo_collectives, tree_bytes
from lion_optax._src.memory_traffic import Traffic, memory_traffic

__all__ = [
    'TARGETS',
    'Collective',
    'Traffic',
    'bytes_sent_per_device',
    'compile_step',
    'hlo_collectives',
    'memory_traffic',
    'target_devices',
    'tree_bytes',
    'unavailable',
]
