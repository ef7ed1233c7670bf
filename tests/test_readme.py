"""Every Python block of the README runs as written, alone, in a fresh process.

Blocks run as scripts (``python block.py``) from an empty folder, so each needs its
own imports and data. The mesh examples configure 8 simulated CPU devices
themselves; the many-hosts example launches its two processes itself. The blocks
run concurrently (they are independent).
"""

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
TEXT = README.read_text()
BLOCKS = re.findall(r'^```(?:python|py)\n(.*?)^```', TEXT, flags=re.S | re.M)


def _run(index: int, folder: pathlib.Path) -> subprocess.CompletedProcess:
    script = folder / f'readme_block_{index}.py'
    script.write_text(BLOCKS[index])
    env = {k: v for k, v in os.environ.items() if not k.startswith('XLA_')}
    env['JAX_PLATFORMS'] = 'cpu'
    return subprocess.run([sys.executable, str(script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def readme_block_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp('readme')
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda i: _run(i, folder), range(len(BLOCKS))))


def test_readme_has_python_examples_and_no_untested_python():
    assert len(BLOCKS) >= 8
    fences = re.findall(r'^```(\w*)$', TEXT, flags=re.M)
    assert set(fences) <= {'', 'python', 'py', 'bash'}, set(fences)


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_example_runs(readme_block_results, index):
    result = readme_block_results[index]
    assert result.returncode == 0, (
        f'README python block {index} failed:\n{BLOCKS[index][:400]}\n'
        f'stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}'
    )
