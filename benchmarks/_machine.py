"""What machine a benchmark ran on, for its report."""

import os
import platform
import re
from typing import Any

import jax
import optax


def machine() -> dict[str, Any]:
    """Device, CPU model and count, library versions and the load average at start."""
    model = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            names = re.findall(r'model name\s*:\s*(.*)', f.read())
        model = names[0] if names else model
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        'device': f'{device.platform}: {device.device_kind}',
        'cpu_model': model,
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
        'optax': optax.__version__,
        'python': platform.python_version(),
        'load_average_at_start': os.getloadavg() if hasattr(os, 'getloadavg') else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    """The report's one-line description of :func:`machine`'s result."""
    return (
        f'Machine: {m["device"]}, {m["cpu_model"]}, {m["cpu_count"]} cores; jax {m["jax"]}, '
        f'optax {m["optax"]}. Load average at start: {m["load_average_at_start"]}.'
    )
