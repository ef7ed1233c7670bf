"""lion_optax: the Lion optimizer (EvoLved Sign Momentum) as Optax transformations.

The public API, grouped by concept; each name lives in one ``_src`` module.
"""

# The optimizer and its pieces: direction -> weight decay -> learning rate.
from lion_optax._src.alias import LionDiagnosticsState, lion
from lion_optax._src.direction import ScaleByLionInt8State, ScaleByLionState, scale_by_lion
from lion_optax._src.nonfinite import SkipNonfiniteState, skip_nonfinite
from lion_optax._src.schedules import LionHyperparameters, adamw_to_lion, warmup_cosine_schedule
from lion_optax._src.weight_decay import AddDecoupledWeightDecayState, add_decoupled_weight_decay

# The Lion-K family, constraint diagnostics and sign monitors.
from lion_optax._src.constraints import ConstraintDiagnostics, constraint_diagnostics
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

# Distribution: sharding over a mesh and Distributed Lion.
from lion_optax._src.distributed import (
    SignLayout,
    aggregate_signs,
    distributed_init,
    distributed_lion,
    sign_layout,
    worker_state_specs,
)
from lion_optax._src.sharding import (
    Collective,
    bytes_sent_per_device,
    hlo_collectives,
    shard_optimizer_state,
    tree_bytes,
    zeros_like_sharded,
)

# Checkpoints that refuse a mismatched optimizer.
from lion_optax._src.checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)

__version__ = '0.1.0'

__all__ = [
    'AddDecoupledWeightDecayState',
    'CheckpointCorruptError',
    'CheckpointMismatchError',
    'Collective',
    'ConstraintDiagnostics',
    'Int8Momentum',
    'Kappa',
    'LionDiagnosticsState',
    'LionHyperparameters',
    'RoundUpdatesToParamsState',
    'ScaleByLionInt8State',
    'ScaleByLionState',
    'SignLayout',
    'SignMonitorState',
    'SkipNonfiniteState',
    'adamw_to_lion',
    'add_decoupled_weight_decay',
    'aggregate_signs',
    'bytes_sent_per_device',
    'clip_kappa',
    'constraint_diagnostics',
    'custom_kappa',
    'distributed_init',
    'distributed_lion',
    'hlo_collectives',
    'l2_kappa',
    'latest_step',
    'lion',
    'lp_kappa',
    'monitor_signs',
    'resolve_kappa',
    'restore_checkpoint',
    'round_updates_to_params',
    'save_checkpoint',
    'scale_by_lion',
    'shard_optimizer_state',
    'sign_agreement',
    'sign_flip_fraction',
    'sign_kappa',
    'sign_layout',
    'skip_nonfinite',
    'stochastic_round',
    'tanh_kappa',
    'tree_bytes',
    'warmup_cosine_schedule',
    'worker_state_specs',
    'zeros_like_sharded',
]
