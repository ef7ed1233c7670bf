"""The API reference documents exactly the public API, and renders every notebook
with its outputs.

Reads the sources under docs/ and the notebooks (no Sphinx build; `.ci/run` builds
them with -W).
"""

import importlib
import importlib.util
import json
import pathlib
import re

import nbformat

import lion_optax

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'
SUBMODULES = ('lion_optax.hlo', 'lion_optax.checkpoint')
_DIRECTIVE = re.compile(r'^\.\. (currentmodule|automodule|auto\w+)::\s*(\S+)', re.MULTILINE)


def _documented() -> dict[str, list[str]]:
    """Fully qualified name -> the API pages with an autodoc directive for it."""
    found: dict[str, list[str]] = {}
    for page in sorted((DOCS / 'api').glob('*.rst')):
        module = None
        for directive, target in _DIRECTIVE.findall(page.read_text()):
            if directive == 'currentmodule':
                module = target
                continue
            name = target if directive == 'automodule' or module is None else f'{module}.{target}'
            found.setdefault(name, []).append(page.name)
    return found


def _public() -> set[str]:
    names = {f'lion_optax.{name}' for name in lion_optax.__all__} | set(SUBMODULES)
    for module in SUBMODULES:
        names |= {f'{module}.{name}' for name in importlib.import_module(module).__all__}
    return names


def test_every_public_name_is_documented_once():
    documented = _documented()
    missing = sorted(_public() - set(documented))
    assert not missing, f'public names with no autodoc entry under docs/api/: {missing}'
    twice = {name: pages for name, pages in documented.items() if len(pages) > 1}
    assert not twice, f'documented more than once (Sphinx warns): {twice}'


def test_nothing_documented_that_is_not_public():
    stale = sorted(set(_documented()) - _public())
    assert not stale, f'docs/api/ documents names that are not public (renamed?): {stale}'


def test_every_api_page_and_notebook_is_in_the_index():
    index = (DOCS / 'index.rst').read_text()
    for page in sorted((DOCS / 'api').glob('*.rst')):
        assert f'api/{page.stem}' in index, f'docs/api/{page.name} is not in the toctree'
    notebooks = DOCS / 'notebooks'
    assert notebooks.is_symlink() and notebooks.resolve() == DOCS.parent / 'notebooks'
    for notebook in sorted(notebooks.glob('*.ipynb')):
        assert f'notebooks/{notebook.stem}' in index, f'{notebook.name} is not in the toctree'


# ---------------------------------------------------------------------------
# The notebook pages show their outputs: conf.py renders them as stored, so the
# .ipynb files must hold every output, figures included, of their current code.

NOTEBOOKS = DOCS.parent / 'notebooks'
# A cell that draws: pyplot, a Figure shown or saved, an IPython Image.
_DRAWS = re.compile(r'\bplt\.|\.savefig\(|^show\(|\bImage\(', re.MULTILINE)
_HIDES = {'remove-output', 'remove-cell', 'hide-output', 'remove_output', 'remove_cell'}


def _store_script():
    spec = importlib.util.spec_from_file_location('store', DOCS / 'store_notebook_outputs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(notebook):
    return [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']


def _source(cell):
    return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def test_the_docs_render_notebooks_with_their_stored_outputs():
    conf = (DOCS / 'conf.py').read_text()
    assert re.search(r"^nb_execution_mode = 'off'$", conf, flags=re.MULTILINE), (
        'conf.py must render the notebooks as stored (their outputs are in the .ipynb)'
    )


def test_every_notebook_is_stored_run_with_its_figures():
    """Issue 18: the pages the README points to for plots showed code only."""
    store = _store_script()
    notebooks = sorted(NOTEBOOKS.glob('*.ipynb'))
    assert {'kappa_dynamics', 'main_job_results'} <= {p.stem for p in notebooks}
    rerun = 'run `.venv/bin/python docs/store_notebook_outputs.py` and commit the notebooks'
    for path in notebooks:
        notebook = json.loads(path.read_text())
        cells = _code_cells(notebook)
        counts = [cell['execution_count'] for cell in cells]
        assert counts == list(range(1, len(cells) + 1)), (
            f'{path.name} is not stored run top to bottom (execution counts {counts}): {rerun}'
        )
        stored_for = notebook['metadata'].get('lion_optax', {}).get('outputs_of')
        assert stored_for == store.code_digest(nbformat.reads(path.read_text(), as_version=4)), (
            f'{path.name}: its code changed since its outputs were stored: {rerun}'
        )
        figures = 0
        for index, cell in enumerate(cells):
            kinds = [output['output_type'] for output in cell['outputs']]
            assert 'error' not in kinds, f'{path.name} code cell {index} stored an error'
            assert not any(o.get('name') == 'stderr' for o in cell['outputs']), (
                f'{path.name} code cell {index} wrote to stderr (a warning?), which the page shows'
            )
            images = sum('image/png' in output.get('data', {}) for output in cell['outputs'])
            if _DRAWS.search(_source(cell)):
                assert images, f'{path.name} code cell {index} draws but stores no figure: {rerun}'
                hidden = _HIDES & set(cell['metadata'].get('tags', []))
                assert not hidden, f'{path.name} code cell {index} hides its figure ({hidden})'
            figures += images
        if path.stem in ('kappa_dynamics', 'main_job_results'):  # the README sends readers here
            assert figures >= 2, f'{path.name} stores {figures} figure(s)'
