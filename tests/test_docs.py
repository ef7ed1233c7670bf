"""The API reference documents exactly the public API, and renders every notebook.

Reads the sources under docs/ (no Sphinx build; `.ci/run` builds them with -W).
"""

import importlib
import pathlib
import re

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
