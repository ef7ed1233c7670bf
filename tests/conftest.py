"""Shared pytest configuration: this process runs JAX on one CPU device.

Multi-device tests start their own processes with jax_num_cpu_devices=8.
Warnings are errors (pyproject's filterwarnings).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
