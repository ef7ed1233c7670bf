"""Reading compiled programs: collectives, memory traffic, bytes per device.

For tests and benchmarks: how much a compiled step communicates
(:func:`hlo_collectives`, :func:`bytes_sent_per_device`), how many bytes its
kernels move through main memory and how many kernels it launches
(:func:`memory_traffic`, on any compiler, ahead of time for TPU and GPU too),
and how much memory a state takes per device (:func:`tree_bytes`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lion_optax import hlo
  >>> hlo.hlo_collectives(jax.jit(jnp.sin).lower(jnp.ones(3)).compile())
  []
"""

from lion_optax._src.hlo import Collective, bytes_sent_per_device, hlo_collectives, tree_bytes
from lion_optax._src.memory_traffic import Traffic, memory_traffic

__all__ = [
    'Collective',
    'Traffic',
    'bytes_sent_per_device',
    'hlo_collectives',
    'memory_traffic',
    'tree_bytes',
]
