"""The public API: pinned, documented, and nothing left out or duplicated."""

import importlib
import inspect
import typing

import optax

import lion_optax

PUBLIC = [
    'Cautious', 'Diagnostics', 'FullyDecoupled', 'Rounding',
    'ConstraintDiagnostics', 'Int8Momentum', 'Kappa', 'LionDiagnosticsState',
    'LionHyperparameters', 'RoundUpdatesToParamsState', 'ScaleByLionInt8State',
    'ScaleByLionState', 'SignLayout', 'SignMonitorState', 'SkipNonfiniteState',
    'adamw_to_lion', 'add_decoupled_weight_decay', 'aggregate_signs', 'clip_kappa',
    'constraint_diagnostics', 'custom_kappa', 'distributed_init', 'distributed_lion', 'hlo',
    'l2_kappa', 'lion', 'lp_kappa', 'monitor_signs', 'resolve_kappa',
    'round_updates_to_params', 'scale_by_lion', 'shard_optimizer_state', 'sign_agreement',
    'sign_flip_fraction', 'sign_kappa', 'sign_layout', 'skip_nonfinite', 'stochastic_round',
    'tanh_kappa', 'warmup_cosine_schedule', 'worker_state_specs', 'zeros_like_sharded',
]
SUBMODULES = {
    'lion_optax.hlo': ['Collective', 'TARGETS', 'Traffic', 'bytes_sent_per_device',
                       'compile_step', 'hlo_collectives', 'memory_traffic', 'target_devices',
                       'tree_bytes', 'unavailable'],
    'lion_optax.checkpoint': ['CheckpointCorruptError', 'CheckpointMismatchError',
                              'latest_step', 'restore_checkpoint', 'save_checkpoint'],
}


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
