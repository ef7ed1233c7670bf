"""Shared pytest configuration: one CPU device in this process, strict numerics."""

import os

# The main test process keeps one device; multi-device tests start their own
# processes with jax_num_cpu_devices=8.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

# Rank promotion would hide a gradient of the wrong shape: make it an error.
jax.config.update('jax_numpy_rank_promotion', 'raise')
