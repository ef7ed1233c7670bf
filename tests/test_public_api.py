"""The public API: every exported name exists, has a docstring, and nothing is left out."""

import inspect

import lion_optax


def test_all_names_exist_and_are_documented():
    for name in lion_optax.__all__:
        obj = getattr(lion_optax, name)
        assert inspect.getdoc(obj), f'{name} has no docstring'


def test_every_public_function_has_an_example():
    for name in lion_optax.__all__:
        obj = getattr(lion_optax, name)
        if inspect.isfunction(obj):
            assert 'Example' in inspect.getdoc(obj), f'{name} has no Example'


def test_all_lists_every_public_import():
    public = {n for n, v in vars(lion_optax).items()
              if not n.startswith('_') and not inspect.ismodule(v)}
    assert public == set(lion_optax.__all__)
