"""Sphinx configuration: the API reference from the docstrings, and the notebooks.

Builds offline (no intersphinx, nothing downloaded) with warnings as errors:

    sphinx-build -W --keep-going -b html docs docs/_build/html

``nitpicky`` makes every unresolved cross-reference a warning, so a broken
``:func:`` in a docstring fails the build. Names from other projects (optax,
jax, numpy) cannot resolve without intersphinx; they are listed in
``nitpick_ignore_regex`` below.
"""

import importlib
import os
import re
import sys

# Document the checkout this file is in, even if another lion_optax is installed.
sys.path.insert(0, os.path.abspath('..'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import lion_optax  # noqa: E402

project = 'lion_optax'
author = 'lion_optax authors'
copyright = 'lion_optax authors'
release = lion_optax.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'myst_nb',
]

exclude_patterns = ['_build', '**/.ipynb_checkpoints']

# autodoc: signatures as written, the docstring of the object itself, and the
# order of the API pages (they follow lion_optax/__init__.py's grouping).
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 88

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every cross-reference must resolve: a broken one is a warning, so an error under -W.
nitpicky = True
# Other projects' names cannot resolve offline (no intersphinx); they appear in
# signatures and type annotations.
nitpick_ignore_regex = [
    (r'py:.*', r'(optax|jax|jaxlib|numpy|np|jnp|orbax|chex)(\..*)?'),
    (r'py:.*', r'(os\.PathLike|collections\.abc\..*|typing\..*|pathlib\..*)'),
]

# Notebooks: rendered with the outputs stored in them (figures included), never executed
# here: executing all three would add ~30 s to every build on 2 cores, and nbmake already
# runs them in the tests. docs/store_notebook_outputs.py runs them and stores the outputs;
# tests/test_docs.py refuses a notebook stored without them or with outputs of older code.
nb_execution_mode = 'off'
myst_enable_extensions = ['dollarmath', 'amsmath']

html_theme = 'furo'
html_title = f'lion_optax {release}'


# Signatures and attribute types: optax's and jax's type aliases (optax.ScalarOrSchedule,
# optax.Params, ...) are unions that Sphinx would print expanded, over several lines each. Print
# their names instead, and lion_optax's own classes by their public path (lion_optax.Kappa, not
# lion_optax._src.kappa.Kappa), so that their links go to the documented object.
def _readable_types(app):
    import jax
    import optax
    from sphinx.util.typing import stringify_annotation

    aliases = {
        'optax.ScalarOrSchedule': optax.ScalarOrSchedule,
        'optax.Schedule': optax.Schedule,
        'optax.Params': optax.Params,
        'jax.typing.ArrayLike': jax.typing.ArrayLike,
        'jax.Array': jax.Array,
    }
    public = {}
    for module_name in ('lion_optax', 'lion_optax.hlo', 'lion_optax.checkpoint'):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and obj.__module__.startswith('lion_optax._src'):
                public[f'{obj.__module__}.{obj.__qualname__}'] = f'{module_name}.{name}'

    def table(mode, prefix):
        # How Sphinx prints each alias in this mode; longest first, so that a union is
        # replaced before the unions inside it.
        names = {stringify_annotation(a, mode): prefix + n for n, a in aliases.items()}
        return sorted({**names, **public}.items(), key=lambda kv: -len(kv[0]))

    in_signatures = table('smart', '~')  # autodoc_typehints_format = 'short'
    in_docstrings = table('fully-qualified-except-typing', '')  # napoleon's attribute types

    def rewrite(text, replacements):
        for long, short in replacements:
            text = text.replace(long, short)
        return re.sub(r'optax\._src\.\w+\.', 'optax.', text)

    def process_signature(app, what, name, obj, options, signature, return_annotation):
        return (
            signature and rewrite(signature, in_signatures),
            return_annotation and rewrite(return_annotation, in_signatures),
        )

    def process_docstring(app, what, name, obj, options, lines):
        lines[:] = [rewrite(x, in_docstrings) if ':type:' in x else x for x in lines]

    app.connect('autodoc-process-signature', process_signature)
    # After napoleon (priority 500), which writes the attributes' ``:type:`` from annotations.
    app.connect('autodoc-process-docstring', process_docstring, priority=600)


def setup(app):
    app.connect('builder-inited', _readable_types)
