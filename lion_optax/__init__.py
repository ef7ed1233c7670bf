"""lion_optax: the Lion optimizer (EvoLved Sign Momentum) as Optax transformations.

The data path, top to bottom: :func:`lion` chains :func:`scale_by_lion` (the
direction), :func:`add_decoupled_weight_decay` and the learning rate. Tools for
tests and benchmarks live in :mod:`lion_optax.hlo`; checkpoints (orbax, the
``checkpoint`` extra) in :mod:`lion_optax.checkpoint`.
"""

# The optimizer and its pieces: direction -> weight decay -> learning rate.
from lion_optax._src.alias import lion
from lion_optax._src.direction import ScaleByLionInt8State, ScaleByLionState, scale_by_lion
from lion_optax._src.guard import LionDiagnosticsState
from lion_optax._src.options import Cautious, Diagnostics
from lion_optax._src.rounding import Rounding
from lion_optax._src.weight_decay import FullyDecoupled, add_decoupled_weight_decay

# Hyperparameters from an AdamW baseline, and the schedule that suits Lion.
from lion_optax._src.schedules import LionHyperparameters, adamw_to_lion, warmup_cosine_schedule

# Non-finite gradients: whole steps skipped and counted (the default is element-wise).
from lion_optax._src.nonfinite import SkipNonfiniteState, skip_nonfinite

# The Lion-K family, constraint diagnostics and sign monitors.
from lion_optax._src.kappa import (
    Kappa,
    clip_kappa,
    custom_kappa,
    l2_kappa,
    lp_kappa,
    resolve_kappa,
    sign_kappa,
    tanh_kappa,
)
from lion_optax._src.constraints import ConstraintDiagnostics, constraint_diagnostics
from lion_optax._src.monitors import (
    SignMonitorState,
    monitor_signs,
    sign_agreement,
    sign_flip_fraction,
)

# Precision: low-precision momentum and parameters.
from lion_optax._src.momentum_storage import Int8Momentum
from lion_optax._src.param_rounding import RoundUpdatesToParamsState, round_updates_to_params
from lion_optax._src.rounding import stochastic_round

# Many devices: sharded state, ZeRO, Distributed Lion.
from lion_optax._src.sharding import shard_optimizer_state, zeros_like_sharded
from lion_optax._src.sign_aggregation import SignLayout, aggregate_signs, sign_layout
from lion_optax._src.distributed import distributed_init, distributed_lion, worker_state_specs

from lion_optax import hlo  # noqa: E402  (submodule: HLO traffic accounting)

__version__ = '0.2.0'

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
    'SignLayout',
    'SignMonitorState',
    'SkipNonfiniteState',
    'adamw_to_lion',
    'add_decoupled_weight_decay',
    'aggregate_signs',
    'clip_kappa',
    'constraint_diagnostics',
    'custom_kappa',
    'distributed_init',
    'distributed_lion',
    'hlo',
    'l2_kappa',
    'lion',
    'lp_kappa',
    'monitor_signs',
    'resolve_kappa',
    'round_updates_to_params',
    'scale_by_lion',
    'shard_optimizer_state',
    'sign_agreement',
    'sign_flip_fraction',
    'sign_kappa',
    'sign_layout',
    'skip_nonfinite',
    'stochastic_round',
    'tanh_kappa',
    'warmup_cosine_schedule',
    'worker_state_specs',
    'zeros_like_sharded',
]
