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

import jax  # noqa: E402
import pytest  # noqa: E402

# Strict, as optimistix's suite: no implicit dtype promotion between array types (a
# float32 step silently computed in float64, a bf16 momentum promoted to float32) and
# no implicit rank broadcasting, in lion_optax's code. optax 0.2.8 itself is not
# strict (its schedules compute 0.1 * count with an int32 count, MultiSteps and
# apply_updates mix dtypes), so tests that run such optax code say so with
# @pytest.mark.optax_promotion and run with standard promotion; processes the tests
# start (README blocks, notebooks, the main job) are user code and run as users do.
jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')

# Fixtures that start processes (eight simulated devices, two jax.distributed
# processes, a checkpoint saver to kill, the main job's tiny run): a test that uses
# one is end-to-end, so `pytest -m "not slow"` leaves it out.
PROCESS_FIXTURES = frozenset({
    'eight_devices', 'sharding_on_eight_devices', 'saver_server', 'tiny_run',
    'readme_block_results',
})


@pytest.fixture(scope='session')
def sharding_on_eight_devices(tmp_path_factory, worker_id):
    """The results of ``_multidevice_sharding.py``: eight CPU devices in a subprocess.

    One process for the whole run, read by test_sharding.py (placement) and
    test_zero.py (the ZeRO wrapper): under pytest-xdist the files may run on two
    workers, so the first to ask runs it (under a file lock, in the folder the
    workers share) and the other reads its results.
    """
    import fcntl  # noqa: PLC0415
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from _helpers import eight_device_checks  # noqa: PLC0415

    base = tmp_path_factory.getbasetemp()
    folder = (base if worker_id == 'master' else base.parent) / 'sharding_on_eight_devices'
    folder.mkdir(exist_ok=True)
    out = folder / 'checks.json'
    with open(folder / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return json.loads(out.read_text())
        script = Path(__file__).with_name('_multidevice_sharding.py')
        return eight_device_checks(script, out, str(out), str(folder / 'checkpoints'))


@pytest.fixture(autouse=True)
def _promotion(request):
    """Standard dtype promotion for the tests marked optax_promotion (see above)."""
    if request.node.get_closest_marker('optax_promotion') is None:
        yield
        return
    with jax.numpy_dtype_promotion('standard'):
        yield


def pytest_collection_modifyitems(config, items):
    """Marks notebooks and tests that start processes as slow."""
    for item in items:
        uses_a_process = PROCESS_FIXTURES & set(getattr(item, 'fixturenames', ()))
        if uses_a_process or item.path.suffix == '.ipynb':
            item.add_marker(pytest.mark.slow)
