"""Reading compiled programs: collectives, bytes sent per device, bytes held.

For tests and benchmarks: how much a compiled step communicates and how much
memory a state takes per device.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lion_optax import hlo
  >>> hlo.hlo_collectives(jax.jit(jnp.sin).lower(jnp.ones(3)).compile())
  []
"""

from lion_optax._src.hlo import Collective, bytes_sent_per_device, hlo_collectives, tree_bytes

__all__ = ['Collective', 'bytes_sent_per_device', 'hlo_collectives', 'tree_bytes']
