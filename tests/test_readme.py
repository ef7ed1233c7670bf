"""Every Python block of the README runs as written, alone, in a fresh process,
without a warning, and prints what its comments say.

Blocks run as scripts (``python -W error block.py``, with ``PYTHONWARNINGS=error``
for the processes a block starts itself) from an empty folder, so each needs its
own imports and data, and a warning (e.g. a ``DeprecationWarning`` from a library)
fails it: pytest's own warning filter does not reach a child process. The mesh
examples configure 8 simulated CPU devices themselves; the many-hosts example
launches its two processes itself. The blocks run concurrently (they are
independent).

Printed values are checked against the comment on their ``print(...)`` line, by
this rule:

* ``# about X`` / ``# ≈X`` / ``# ... = X`` (the first such marker in the comment),
  where X is a number, several numbers or a bracketed list of them: the numbers
  the line prints must be as many and each within 5% of X's (a loss or a
  stochastic statistic is stated to two digits, not bit for bit).
* Otherwise, when the comment up to its first ``: `` is made of Python literals
  (``# 1 1``, ``# []``, ``# True``), the printed line must be exactly that.
* Otherwise the comment is a description (``# sharded like the params``) and must
  not contain a digit: a number this rule cannot read is an error, so no comment
  states a value that goes unchecked.

A block with such a comment must print one line per ``print`` call, each at the
top level (run once), so that the n-th call's comment is compared with the n-th
line of output.
"""

import ast
import concurrent.futures
import io
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
TEXT = README.read_text()
BLOCKS = re.findall(r'^```(?:python|py)\n(.*?)^```', TEXT, flags=re.S | re.M)

_NUMBER = r'[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?'
_VALUES = rf'\[?\s*{_NUMBER}(?:[\s,]+{_NUMBER})*\s*\]?'
_APPROXIMATE = re.compile(rf'(?:\babout\s+|≈\s*|\s=\s*)({_VALUES})', flags=re.I)


def _run(index: int, folder: pathlib.Path) -> subprocess.CompletedProcess:
    script = folder / f'readme_block_{index}.py'
    script.write_text(BLOCKS[index])
    env = {k: v for k, v in os.environ.items() if not k.startswith('XLA_')}
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONWARNINGS'] = 'error'  # also for the processes a block starts
    return subprocess.run([sys.executable, '-W', 'error', str(script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def readme_block_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp('readme')
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda i: _run(i, folder), range(len(BLOCKS))))


def _print_comments(block: str) -> list[tuple[str, str | None]]:
    """``(source line, its comment or None)`` for each line of ``block`` that calls print."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(block).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string[1:].strip()
    return [(line, comments.get(number))
            for number, line in enumerate(block.splitlines(), start=1) if 'print(' in line]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(_NUMBER, text, flags=re.I)]


def _check_comment(comment: str, printed: str) -> str | None:
    """Why ``printed`` is not what ``comment`` says (see the module docstring), or None."""
    approximate = _APPROXIMATE.search(comment)
    if approximate:
        expected, actual = _numbers(approximate.group(1)), _numbers(printed)
        if len(expected) != len(actual) or not np.allclose(actual, expected, rtol=0.05, atol=0):
            return f'expected about {expected}, printed {printed!r}'
        return None
    claim = comment.split(': ', 1)[0]
    if claim == printed.strip():
        return None
    if _is_literal(claim):
        return f'expected {claim!r}, printed {printed!r}'
    if re.search(r'\d', comment):
        return (f'the comment {comment!r} states a value that is neither the printed line '
                f'{printed!r} nor of the form "about X"')
    return None


def _is_literal(claim: str) -> bool:
    """Whether every word of ``claim`` is a Python literal (``[]``, ``1``, ``True``)."""
    try:
        for word in claim.split():
            ast.literal_eval(word)
    except (ValueError, SyntaxError):
        return False
    return bool(claim.split())


def test_readme_has_python_examples_and_no_untested_python():
    assert len(BLOCKS) >= 8
    fences = re.findall(r'^```(\w*)$', TEXT, flags=re.M)
    assert set(fences) <= {'', 'python', 'py', 'bash'}, set(fences)


def test_the_comment_rule_reads_what_it_must():
    """The rule itself: it must accept what is true and refuse what is not."""
    assert _check_comment('about 6e-4, from 3.4 at the start', '0.00059607066') is None
    assert _check_comment('about 6e-4, from 3.4 at the start', '0.0007') is not None
    assert _check_comment('both moved twice: about [-0.2 -0.2]', '[-0.19999 -0.19999]') is None
    assert _check_comment('λ·max|θ| = 1.5: outside the box', '1.5') is None
    assert _check_comment('≈0.5 flips: noise-dominated steps', '0.0 1.0') is not None
    assert _check_comment('1 1', '1 1') is None and _check_comment('1 1', '1 0') is not None
    assert _check_comment('[]', '[]') is None and _check_comment('[]', "['all-reduce']")
    assert _check_comment('sharded like the params', 'anything') is None
    assert _check_comment('2 bytes/param', 'anything') is not None


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_example_runs(readme_block_results, index):
    result = readme_block_results[index]
    assert result.returncode == 0, (
        f'README python block {index} failed (warnings are errors):\n{BLOCKS[index][:400]}\n'
        f'stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}'
    )


COMMENTED = [i for i, block in enumerate(BLOCKS) if any(c for _, c in _print_comments(block))]


def test_readme_states_printed_values():
    assert len(COMMENTED) >= 4, COMMENTED  # the check below is not vacuous


@pytest.mark.parametrize('index', COMMENTED)
def test_readme_example_prints_what_its_comments_say(readme_block_results, index):
    prints = _print_comments(BLOCKS[index])
    result = readme_block_results[index]
    assert result.returncode == 0, 'the block failed: see test_readme_example_runs'
    lines = result.stdout.splitlines()
    assert all(line.startswith('print(') for line, _ in prints) and len(lines) == len(prints), (
        f'README python block {index}: a block whose prints carry comments must print one '
        f'line per top-level print call; it has {len(prints)} print calls and printed:\n'
        f'{result.stdout}'
    )
    wrong = [f'{line.strip()}\n    {why}' for (line, comment), printed in zip(prints, lines)
             if comment and (why := _check_comment(comment, printed))]
    assert not wrong, f'README python block {index} prints other values than its comments say:\n' + \
        '\n'.join(wrong)
