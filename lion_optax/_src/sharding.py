"""Sharding helpers: optimizer state that lives where the parameters live."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def zeros_like_sharded(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Zeros with ``x``'s shape, ``dtype`` (default ``x``'s) and sharding."""
    return jnp.zeros_like(x, dtype=dtype)
