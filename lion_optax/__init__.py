"""lion_optax: the Lion optimizer (EvoLved Sign Momentum) as Optax transformations.

The data path, top to bottom: :func:`lion` chains :func:`scale_by_lion` (the
direction), :func:`add_decoupled_weight_decay` and the learning rate. Tools for
tests and benchmarks live in :mod:`lion_optax.hlo`; checkpoints (orbax, the
``checkpoint`` extra) in :mod:`lion_optax.checkpoint`.
"""

import warnings as _warnings
from typing import Any as _Any

# The optimizer and its pieces: direction -> weight decay -> learning rate.
from lion_optax._src.alias import lion
from lion_optax._src.direction import ScaleByLionInt8State, ScaleByLionState, scale_by_lion
from lion_optax._src.weight_decay import FullyDecoupled, add_decoupled_weight_decay

# Options that go together, one value each.
from lion_optax._src.options import Cautious, Diagnostics
from lion_optax._src.rounding import Rounding
from lion_optax._src.momentum_storage import Int8Momentum

# Bad steps: skipped (lion's guard, or any transformation's) and counted.
from lion_optax._src.guard import LionDiagnosticsState
from lion_optax._src.nonfinite import SkipNonfiniteState, skip_nonfinite

# Hyperparameters from an AdamW baseline.
from lion_optax._src.schedules import LionHyperparameters, adamw_to_lion

# The Lion-K family (names such as 'clip' or 'l2' select the others), constraint
# diagnostics and sign monitors.
from lion_optax._src.kappa import Kappa, lp_kappa, tanh_kappa
from lion_optax._src.constraints import ConstraintDiagnostics, constraint_diagnostics
from lion_optax._src.monitors import (
    SignMonitorState,
    monitor_signs,
    sign_agreement,
    sign_flip_fraction,
)

# Low-precision parameters.
from lion_optax._src.param_rounding import RoundUpdatesToParamsState, round_updates_to_params
from lion_optax._src.rounding import stochastic_round

# Many devices: ZeRO, Distributed Lion.
from lion_optax._src.zero import shard_optimizer_state
from lion_optax._src.sign_aggregation import aggregate_signs
from lion_optax._src.distributed import distributed_init, distributed_lion

from lion_optax import hlo  # noqa: E402  (submodule: compiled programs, ahead-of-time compiles)

__version__ = '0.3.0'

__all__ = [
    'Cautious',
    'ConstraintDiagnostics',
    'Diagnostics',
    'FullyDecoupled',
    'Int8Momentum',
    'Kappa',
    'LionDiagnosticsState',
    'LionHyperparameters',
    'RoundUpdatesToParamsState',
    'Rounding',
    'ScaleByLionInt8State',
    'ScaleByLionState',
    'SignMonitorState',
    'SkipNonfiniteState',
    'adamw_to_lion',
    'add_decoupled_weight_decay',
    'aggregate_signs',
    'constraint_diagnostics',
    'distributed_init',
    'distributed_lion',
    'hlo',
    'lion',
    'lp_kappa',
    'monitor_signs',
    'round_updates_to_params',
    'scale_by_lion',
    'shard_optimizer_state',
    'sign_agreement',
    'sign_flip_fraction',
    'skip_nonfinite',
    'stochastic_round',
    'tanh_kappa',
]


def _moved(module: str, name: str) -> _Any:
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)


# Names of lion_optax 0.2 that left the top level: (where the object now is, what to write).
_DEPRECATED = {
    'resolve_kappa': ('lion_optax._src.kappa', 'resolve_kappa',
                      'pass the kappa (a name, a Kappa or a callable) to lion(kappa=...); '
                      'lion_optax.Kappa.of(kappa) gives its Kappa'),
    'custom_kappa': ('lion_optax._src.kappa', 'custom_kappa',
                     'pass the function itself: lion(kappa=fn), or build a lion_optax.Kappa'),
    'sign_kappa': ('lion_optax._src.kappa', 'sign_kappa', "kappa='sign'"),
    'clip_kappa': ('lion_optax._src.kappa', 'clip_kappa', "kappa='clip'"),
    'l2_kappa': ('lion_optax._src.kappa', 'l2_kappa', "kappa='l2' or kappa='l2_global'"),
    'warmup_cosine_schedule': ('lion_optax._src.schedules', 'warmup_cosine_schedule',
                               'optax.schedules.warmup_cosine_decay_schedule(0.0, peak, '
                               'warmup_steps, total_steps, end_value)'),
    'zeros_like_sharded': ('lion_optax._src.sharding', 'zeros_like_sharded',
                           "the optimizer's init, which already shards its state like the "
                           'parameters'),
    'worker_state_specs': ('lion_optax._src.distributed', 'worker_state_specs',
                           'the specs distributed_init returns: state, specs = '
                           'lion_optax.distributed_init(tx, params, mesh)'),
    'sign_layout': ('lion_optax._src.sign_aggregation', 'sign_layout',
                    'lion_optax.hlo.sign_layout'),
    'SignLayout': ('lion_optax._src.sign_aggregation', 'SignLayout', 'lion_optax.hlo.SignLayout'),
}


def __getattr__(name: str) -> _Any:
    if name in _DEPRECATED:
        module, attribute, instead = _DEPRECATED[name]
        _warnings.warn(
            f'lion_optax.{name} is deprecated and will be removed: write {instead} instead.',
            DeprecationWarning,
            stacklevel=2,
        )
        return _moved(module, attribute)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
