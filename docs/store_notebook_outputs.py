"""Runs every notebook once and stores its outputs (figures included) in the .ipynb.

The API reference renders the notebooks as stored (``nb_execution_mode = 'off'`` in
``conf.py``): executing them during every docs build would cost CI minutes, and
without outputs the pages the README points to for plots would show code only.
After editing a notebook (or what its plots draw, e.g. ``benchmarks/main_job/_plots.py``),
run from the repository root:

    .venv/bin/python docs/store_notebook_outputs.py [notebooks/NAME.ipynb ...]

Each notebook runs in ``notebooks/`` (as nbmake runs it in the tests), on the CPU,
without timing metadata, and records the SHA-256 of its code cells under
``metadata.lion_optax.outputs_of``; ``tests/test_docs.py`` refuses a notebook whose
code changed since its outputs were stored, or whose figures are missing.
"""

import hashlib
import os
import pathlib
import sys
import time

import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


def code_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the notebook's code cells, in order: what its stored outputs came from."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == 'code':
            digest.update(cell.source.encode('utf-8') + b'\0')
    return digest.hexdigest()


def store_outputs(path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    os.environ['JAX_PLATFORMS'] = 'cpu'
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name='python3',
        resources={'metadata': {'path': str(path.parent)}},
        record_timing=False,
    )
    client.execute()
    notebook.metadata['lion_optax'] = {'outputs_of': code_digest(notebook)}
    nbformat.validate(notebook)
    path.write_text(nbformat.writes(notebook) + '\n', encoding='utf-8')


def main(paths: list[str]) -> None:
    for path in [pathlib.Path(p).resolve() for p in paths] or sorted(NOTEBOOKS.glob('*.ipynb')):
        start = time.time()
        store_outputs(path)
        print(f'{path.name}: outputs stored ({time.time() - start:.0f} s, '
              f'{path.stat().st_size // 1024} KiB)')


if __name__ == '__main__':
    main(sys.argv[1:])
