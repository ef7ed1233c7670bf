"""Checkpoints of training state that cannot lose or misreport data (orbax).

Needs the ``checkpoint`` extra: ``pip install "lion_optax[checkpoint]"``
(orbax-checkpoint). See :func:`save_checkpoint` for the guarantees.

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from lion_optax import checkpoint
  >>> folder = tempfile.mkdtemp()
  >>> _ = checkpoint.save_checkpoint(folder, 1, {'w': jnp.ones(2)})
  >>> checkpoint.latest_step(folder)
  1
"""

from lion_optax._src.checkpoint.restore import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    restore_checkpoint,
)
from lion_optax._src.checkpoint.save import save_checkpoint
from lion_optax._src.checkpoint.steps import latest_step

__all__ = [
    'CheckpointCorruptError',
    'CheckpointMismatchError',
    'latest_step',
    'restore_checkpoint',
    'save_checkpoint',
]
