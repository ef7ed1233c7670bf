"""Shared pytest configuration: this process runs JAX on one CPU device.

Multi-device tests start their own processes with jax_num_cpu_devices=8.
Warnings are errors (pyproject's filterwarnings).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# A persistent compilation cache: the suite compiles ~1,300 small programs, and a
# second run (the quick `pytest -m "not slow"` loop) loads them instead of compiling
# again (on 2 cores: 80-95 s cold, ~40 s warm). It is keyed by the program, jax
# version and devices, so stale entries are never used; set it in the environment
# so that the processes tests start use it too. LION_OPTAX_TEST_JAX_CACHE=0 turns it off.
if os.environ.get('LION_OPTAX_TEST_JAX_CACHE', '1') != '0':
    os.environ.setdefault(
        'JAX_COMPILATION_CACHE_DIR',
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.jax_cache'),
    )
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

# Fixtures that start processes (eight simulated devices, two jax.distributed
# processes, a checkpoint saver to kill, the main job's tiny run): a test that uses
# one is end-to-end, so `pytest -m "not slow"` leaves it out.
PROCESS_FIXTURES = frozenset({'eight_devices', 'saver_server', 'tiny_run', 'readme_block_results'})


def pytest_collection_modifyitems(config, items):
    """Marks notebooks and tests that start processes as slow."""
    for item in items:
        uses_a_process = PROCESS_FIXTURES & set(getattr(item, 'fixturenames', ()))
        if uses_a_process or item.path.suffix == '.ipynb':
            item.add_marker(pytest.mark.slow)
