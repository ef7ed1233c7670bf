"""The dtype Lion computes in."""

from typing import Any

import jax.numpy as jnp


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the step computes in: the widest input, and at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from lion_optax._src.numerics import compute_dtype
      >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.ones(2, jnp.bfloat16), jnp.float16)
      (dtype('float32'), dtype('float32'))
    """
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)
