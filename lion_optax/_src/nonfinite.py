"""Skipping steps whose gradient is not finite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transformation's state.
      skipped_steps: how many steps were skipped so far (int32 scalar).
    """

    inner_state: Any
    skipped_steps: jax.Array


def all_finite(tree: Any) -> jax.Array:
    """True (a bool scalar) when every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    # x - x is 0 for finite x and NaN for +-Inf and NaN (it cannot overflow): one
    # fused read per leaf, instead of materialising a bool array per leaf and
    # reducing it in stages (measured on XLA:CPU: 8M params, 2.3x -> 1.7x roofline).
    return jnp.isfinite(sum(jnp.sum(leaf - leaf, dtype=jnp.float32) for leaf in leaves))


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    combine_across_workers: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips every step whose gradient holds a NaN or an Inf, anywhere.

    .. math::

      (u_t, S_{t+1}) = \begin{cases}
        \mathrm{inner}(g_t, S_t) & \text{every element of } g_t
          \text{ finite} \\
        (0, S_t) & \text{otherwise}
      \end{cases}

    A skipped step changes nothing: the parameters (the update is zero, weight
    decay included), the momentum, and the step counts that drive schedules.
    ``skipped_steps`` counts them, so a training loop can log or stop on it.
    Unlike ``optax.apply_if_finite`` it never lets a non-finite update through,
    however many steps in a row are bad. The check reads the gradient once
    more (4 bytes per float32 parameter).

    Args:
      inner: the transformation to protect.
      combine_across_workers: for data-parallel code where each worker sees
        its own gradient (inside ``shard_map``): maps this worker's bool
        "all finite" scalar to the decision every worker shares (e.g. a
        ``pmin`` over the data axis), so that no replica steps alone.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`SkipNonfiniteState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax, lion_optax
      >>> tx = lion_optax.skip_nonfinite(optax.sgd(0.1))
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([jnp.nan]), state, params)
      >>> updates, state.skipped_steps
      (Array([0.], dtype=float32), Array(1, dtype=int32))
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipNonfiniteState:
        return SkipNonfiniteState(
            inner_state=inner.init(params), skipped_steps=jnp.zeros([], jnp.int32)
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipNonfiniteState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipNonfiniteState]:
        finite = all_finite(updates)
        if combine_across_workers is not None:
            finite = combine_across_workers(finite)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
        )
        skipped = jnp.where(finite, state.skipped_steps, optax.safe_increment(state.skipped_steps))
        return new_updates, SkipNonfiniteState(inner_state=new_inner, skipped_steps=skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
