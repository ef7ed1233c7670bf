"""Helpers shared by the tests: random trees, trajectories, and the reference."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

import lion_optax

SHAPES = {'w': (4, 3), 'b': (3,), 'scale': (5,)}


def child_env(drop: Sequence[str] = (), **overrides: str) -> dict[str, str]:
    """The environment for a Python child process that must import this
    process's lion_optax and run JAX on the CPU.

    Args:
      drop: variables to leave out (e.g. ``XLA_FLAGS``, which a child that
        simulates devices sets itself).
      **overrides: variables to set.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lion_optax.__file__)))
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [package_root, env.get('PYTHONPATH')]))
    env['JAX_PLATFORMS'] = 'cpu'
    env.update(overrides)
    return env


def eight_device_checks(script: os.PathLike, out: os.PathLike, *args: str) -> dict[str, Any]:
    """Runs ``python script *args`` (eight simulated CPU devices) and reads its JSON ``out``.

    The script sets ``jax_num_cpu_devices`` itself and writes every number the
    tests assert on to ``out``; a failure shows the end of its output.
    """
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=child_env(drop=('XLA_FLAGS',)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def random_params(seed: int, dtype: Any = jnp.float32, shapes=SHAPES) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s), dtype=dtype) for k, s in shapes.items()}


def random_grads(seed: int, steps: int, dtype: Any = jnp.float32, shapes=SHAPES):
    """Gradients whose sign changes often, so the momentum really matters."""
    rng = np.random.default_rng(seed)
    return [
        {k: jnp.asarray(rng.normal(size=s) + 0.3 * np.sin(t / 7.0), dtype=dtype)
         for k, s in shapes.items()}
        for t in range(steps)
    ]


def run_trajectory(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Sequence[Any],
    *,
    update_fn: Callable | None = None,
) -> tuple[list[Any], Any]:
    """Applies ``tx`` to ``grads`` in turn; returns the params after each step."""
    state = tx.init(params)
    step = update_fn or tx.update
    history = []
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def to_leaves(tree: dict[str, jax.Array]) -> dict[str, list[float]]:
    """A dict of arrays as the reference's ``{name: [floats]}``."""
    return {k: [float(x) for x in np.asarray(v, dtype=np.float64).ravel()] for k, v in tree.items()}


def from_leaves(leaves: dict[str, list[float]], like: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(leaves[k], dtype=np.float64).reshape(like[k].shape) for k in like}


def rounding_for(dtype: Any) -> Callable[[float], float] | None:
    """A Python float -> float rounding to ``dtype`` (None for float32/64)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return lambda x: float(np.asarray(x, dtype=ml_dtypes.bfloat16))
    if jnp.dtype(dtype) == jnp.float16:
        return lambda x: float(np.asarray(x, dtype=np.float16))
    return None


def all_finite(tree: Any) -> bool:
    """Whether every element of every leaf of ``tree`` is finite."""
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))
