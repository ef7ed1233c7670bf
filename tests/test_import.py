"""Importing lion_optax starts no JAX backend (users configure devices after imports)."""

import subprocess
import sys


def test_import_leaves_backends_uninitialised():
    code = (
        'import jax, lion_optax\n'
        "jax.config.update('jax_num_cpu_devices', 3)\n"
        'assert jax.device_count() == 3, jax.devices()\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
        env={'JAX_PLATFORMS': 'cpu', 'PATH': ''},
    )
    assert result.returncode == 0, result.stderr[-2000:]
