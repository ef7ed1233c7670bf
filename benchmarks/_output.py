"""What every benchmark reports, and the writing of it into its output folder.

A report is a machine line (:func:`machine`, :func:`machine_line`), markdown tables
(:func:`markdown_table`, put together by :func:`document`), the measurements as JSON and
figures as PNG, which :func:`write` puts into the folder ``--out`` names
(:func:`write_report`: the usual ``NAME.json``, ``NAME.md`` and ``NAME.png``).
:func:`parser` starts a benchmark's command line, :class:`Clock` says how long each part
of a run took (:func:`measure_trees`: one part per parameter tree), and :func:`spread`
summarises repeated measurements as a median and quartiles.

Nothing here imports JAX at the top: ``slow_link``'s launcher uses this module and never
starts JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------
# The machine line.
# ---------------------------------------------------------------------------


def load_average() -> tuple[float, float, float] | None:
    """The machine's 1, 5 and 15 minute load averages (timings mean more on a quiet one)."""
    return os.getloadavg() if hasattr(os, 'getloadavg') else None


def machine() -> dict[str, Any]:
    """Device, CPU model and count, library versions and the load average at start."""
    import jax  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

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
        'load_average_at_start': load_average(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """The report's one-line description of :func:`machine`'s result."""
    return (
        f'Machine: {m["device"]}, {m["cpu_model"]}, {m["cpu_count"]} cores; jax {m["jax"]}, '
        f'optax {m["optax"]}. Load average at start: {m["load_average_at_start"]}.'
    )


# ---------------------------------------------------------------------------
# Numbers and tables.
# ---------------------------------------------------------------------------


def quartiles(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(median, 25th percentile, 75th percentile)`` of ``values``."""
    q25, median, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(median), float(q25), float(q75)


def spread(values: Sequence[float] | np.ndarray, key: str, scale: float = 1.0) -> dict[str, float]:
    """The median and quartiles of ``values`` times ``scale``, as a report's JSON keeps them.

    ``key`` names them with ``{}`` standing for ``median``, ``p25`` and ``p75``:
    ``spread(seconds, '{}_ms', 1e3)`` is ``{'median_ms': ..., 'p25_ms': ..., 'p75_ms': ...}``.
    """
    median, q25, q75 = quartiles(np.asarray(values, dtype=float) * scale)
    return {key.format('median'): median, key.format('p25'): q25, key.format('p75'): q75}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table from header cells and rows of cells."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def document(*blocks: str) -> str:
    """A markdown report from its blocks (headings, paragraphs, tables), a blank line apart."""
    return '\n\n'.join(blocks) + '\n'


# ---------------------------------------------------------------------------
# The command line, the clock and the files.
# ---------------------------------------------------------------------------


def output_folder(path: str) -> pathlib.Path:
    """``--out``'s type: the folder, made at once, so that a bad path fails before the run."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def parser(
    name: str, doc: str, out: str | None, out_help: str | None = None
) -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.<name>``, with its ``--out`` option.

    Args:
      name: the benchmark's module under ``benchmarks``.
      doc: its docstring; the first paragraph describes the command.
      out: the default output folder (None: the benchmark picks one when it runs).
      out_help: how ``--help`` describes the default, when ``out`` is None.
    """
    result = argparse.ArgumentParser(
        prog=f'python -m benchmarks.{name}', description=doc.split('\n\n')[0]
    )
    result.add_argument(
        '--out',
        type=output_folder,
        default=out,
        help=f'output folder (default: {out_help or out})',
    )
    return result


class Clock:
    """Seconds since it was made; :meth:`done` prints them after each part of a run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def done(self, what: str) -> None:
        print(f'{what}: done after {self.seconds:.0f} s', flush=True)


def write(
    out: pathlib.Path,
    files: Mapping[str, Any],
    *,
    indent: int = 2,
    echo: bool = True,
    seconds: float | None = None,
) -> None:
    """Writes a report's files into ``out`` in order, shows its markdown and says what it wrote.

    Args:
      out: the output folder (made if missing).
      files: file name -> contents, by the name's ending: ``.json`` a value JSON can hold
        (numpy numbers are written as floats), ``.md`` text, ``.png`` a matplotlib figure
        (saved at its own dpi; None: no file). Any of them may be a function that makes
        the contents, called when its turn comes, so that a table or figure that fails
        loses none of the files before it (the measurements, when the JSON comes first).
      indent: the JSON's indentation.
      echo: print the markdown (after every file is written).
      seconds: how long the run took, for the closing line.
    """
    out.mkdir(parents=True, exist_ok=True)
    written, shown = [], []
    for name, content in files.items():
        path = out / name
        if callable(content):
            content = content()
        if name.endswith('.json'):
            path.write_text(json.dumps(content, indent=indent, default=float))
        elif name.endswith('.md'):
            path.write_text(content)
            shown.append(content)
        elif name.endswith('.png'):
            if content is None:
                continue
            content.savefig(path)
        else:
            raise ValueError(f'{name}: a report writes .json, .md and .png files')
        written.append(name)
    if echo:
        for text in shown:
            print(text)
    took = '' if seconds is None else f' in {seconds:.0f} s'
    print(f'Wrote {", ".join(written)} to {out.resolve()}{took}', flush=True)


def write_report(
    out: pathlib.Path,
    stem: str,
    report: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """The usual report: ``stem.json`` (``report``), ``stem.md`` and, with ``plot``, ``stem.png``.

    The markdown and the figure are drawn from ``report`` after the JSON is written;
    ``report['wall_seconds']``, where it has one, is the run's time.
    """
    files = {f'{stem}.json': report, f'{stem}.md': lambda: markdown(report)}
    if plot is not None:
        files[f'{stem}.png'] = lambda: plot(report)
    write(out, files, seconds=report.get('wall_seconds'))


def measure_trees(
    trees: Mapping[str, Any], measure: Callable[[Any], dict[str, Any]], quick: bool
) -> dict[str, Any]:
    """The report of a benchmark that measures parameter trees one after the other.

    Returns:
      ``machine`` (:func:`machine`), ``quick``, ``trees`` (name -> ``measure(tree)``,
      printing when each is done) and ``wall_seconds``.
    """
    report: dict[str, Any] = {'machine': machine(), 'quick': quick, 'trees': {}}
    clock = Clock()
    for name, tree in trees.items():
        report['trees'][name] = measure(tree)
        clock.done(name)
    report['wall_seconds'] = clock.seconds
    return report
