"""The public API: pinned, documented, and nothing left out or duplicated."""

import importlib
import inspect
import re
import typing

import optax
import pytest

import lion_optax

PUBLIC = [
    'Cautious', 'ConstraintDiagnostics', 'Diagnostics', 'FullyDecoupled', 'Int8Momentum', 'Kappa',
    'LionDiagnosticsState', 'LionHyperparameters', 'RoundUpdatesToParamsState', 'Rounding',
    'ScaleByLionInt8State', 'ScaleByLionState', 'SignMonitorState', 'SkipNonfiniteState',
    'adamw_to_lion', 'add_decoupled_weight_decay', 'aggregate_signs', 'constraint_diagnostics',
    'distributed_init', 'distributed_lion', 'hlo', 'lion', 'lp_kappa', 'monitor_signs',
    'round_updates_to_params', 'scale_by_lion', 'shard_optimizer_state', 'sign_agreement',
    'sign_flip_fraction', 'skip_nonfinite', 'stochastic_round', 'tanh_kappa',
]
# lion_optax 0.2's top-level names that moved or went: each still resolves, with a warning.
DEPRECATED = {
    'resolve_kappa': 'Kappa.of', 'custom_kappa': 'kappa=fn', 'sign_kappa': "kappa='sign'",
    'clip_kappa': "kappa='clip'", 'l2_kappa': "kappa='l2'",
    'warmup_cosine_schedule': 'warmup_cosine_decay_schedule',
    'zeros_like_sharded': "optimizer's init", 'worker_state_specs': 'distributed_init',
    'sign_layout': 'lion_optax.hlo.sign_layout', 'SignLayout': 'lion_optax.hlo.SignLayout',
}
SUBMODULES = {
    'lion_optax.hlo': ['Collective', 'TARGETS', 'Traffic', 'bytes_sent_per_device',
                       'collectives', 'compile_step', 'memory_traffic', 'sign_layout', 'SignLayout',
                       'target_devices',
                       'tree_bytes', 'unavailable'],
    'lion_optax.checkpoint': ['CheckpointCorruptError', 'CheckpointMismatchError',
                              'latest_step', 'restore_checkpoint', 'save_checkpoint'],
}


def test_deprecated_names_still_resolve_and_say_what_to_write():
    for name, instead in DEPRECATED.items():
        with pytest.warns(DeprecationWarning, match=re.escape(instead)):
            assert getattr(lion_optax, name) is not None
    with pytest.warns(DeprecationWarning, match='lion_optax.hlo.collectives'):
        assert lion_optax.hlo.hlo_collectives is lion_optax.hlo.collectives
    with pytest.raises(AttributeError, match='no attribute'):
        lion_optax.no_such_name  # noqa: B018


def test_all_is_pinned():
    assert sorted(lion_optax.__all__) == sorted(PUBLIC)
    for module, names in SUBMODULES.items():
        assert sorted(importlib.import_module(module).__all__) == sorted(names)


def _objects():
    yield from ((name, getattr(lion_optax, name)) for name in lion_optax.__all__)
    for module, names in SUBMODULES.items():
        yield from ((f'{module}.{n}', getattr(importlib.import_module(module), n)) for n in names)


def test_all_names_exist_and_are_documented():
    for name, obj in _objects():
        assert inspect.getdoc(obj), f'{name} has no docstring'


def test_every_public_function_has_an_example():
    for name, obj in _objects():
        if inspect.isfunction(obj):
            assert 'Example' in inspect.getdoc(obj), f'{name} has no Example'


def test_all_lists_every_public_import():
    public = {n for n, v in vars(lion_optax).items()
              if not n.startswith('_') and (not inspect.ismodule(v) or n == 'hlo')}
    assert public == set(lion_optax.__all__)


def test_annotations_are_objects_that_tools_can_read():
    """No string annotations: optax's helpers check learning_rate's annotation."""
    hints = {k: p.annotation for k, p in inspect.signature(lion_optax.lion).parameters.items()}
    assert hints['learning_rate'] == optax.ScalarOrSchedule
    assert typing.get_args(hints['nonfinite']) == ('zero', 'skip_step', 'propagate')
    for name, obj in _objects():
        if inspect.isfunction(obj):
            for parameter in inspect.signature(obj).parameters.values():
                assert not isinstance(parameter.annotation, str), (name, parameter.name)
