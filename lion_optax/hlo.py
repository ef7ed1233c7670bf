"""Reading compiled programs: collectives, memory traffic, bytes per device.

For tests and benchmarks: how much a compiled step communicates
(:func:`collectives`, :func:`bytes_sent_per_device`, and what Distributed Lion's
signs should cost, :func:`sign_layout`), how many bytes its
kernels move through main memory and how many kernels it launches
(:func:`memory_traffic`, on any compiler), and how much memory a state takes
per device (:func:`tree_bytes`). :func:`compile_step` compiles a step ahead of
time for a TPU or GPU this machine does not have (:data:`TARGETS`,
:func:`target_devices`; the compilers come with the ``accelerators`` extra,
:func:`unavailable` says why one is missing).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lion_optax import hlo
  >>> hlo.collectives(jax.jit(jnp.sin).lower(jnp.ones(3)).compile())
  []
"""

import warnings as _warnings
from typing import Any as _Any

from lion_optax._src.aot import TARGETS, compile_step, target_devices, unavailable
from lion_optax._src.hlo import Collective, bytes_sent_per_device, collectives, tree_bytes
from lion_optax._src.memory_traffic import Traffic, memory_traffic
from lion_optax._src.sign_aggregation import SignLayout, sign_layout

__all__ = [
    'TARGETS',
    'Collective',
    'SignLayout',
    'Traffic',
    'bytes_sent_per_device',
    'collectives',
    'compile_step',
    'memory_traffic',
    'sign_layout',
    'target_devices',
    'tree_bytes',
    'unavailable',
]


def __getattr__(name: str) -> _Any:
    if name == 'hlo_collectives':
        _warnings.warn(
            'lion_optax.hlo.hlo_collectives is deprecated and will be removed: write '
            'lion_optax.hlo.collectives instead.',
            DeprecationWarning,
            stacklevel=2,
        )
        return collectives
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
