"""The dtype Lion computes in."""

from typing import Any

import jax
import jax.numpy as jnp


def compute_dtype(*values: Any) -> jnp.dtype:
    """The dtype the step computes in: the widest input, and at least float32.

    Decided from each input's own dtype, so that it is the same whatever
    ``jax_numpy_dtype_promotion`` is (``'strict'`` refuses to promote bfloat16
    with float32, which is what a bf16 momentum of float32 parameters asks).
    float64 only with ``jax_enable_x64``.

    Example:
      >>> import jax.numpy as jnp
      >>> from lion_optax._src.numerics import compute_dtype
      >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.ones(2, jnp.bfloat16), jnp.float16)
      (dtype('float32'), dtype('float32'))
    """
    width = max((jnp.dtype(jnp.result_type(v)).itemsize for v in values), default=4)
    return jax.dtypes.canonicalize_dtype(jnp.float64 if width > 4 else jnp.float32)
