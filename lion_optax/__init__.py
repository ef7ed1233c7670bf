"""lion_optax: the Lion optimizer (EvoLved Sign Momentum) as Optax transformations."""

# core
from lion_optax._src.alias import lion
from lion_optax._src.direction import ScaleByLionState, scale_by_lion
from lion_optax._src.kappa import (
    Kappa,
    clip_kappa,
    custom_kappa,
    l2_kappa,
    lp_kappa,
    sign_kappa,
    tanh_kappa,
)
from lion_optax._src.nonfinite import SkipNonfiniteState, skip_nonfinite
from lion_optax._src.schedules import (
    LionHyperparameters,
    adamw_to_lion,
    warmup_cosine_schedule,
)
from lion_optax._src.weight_decay import (
    AddDecoupledWeightDecayState,
    add_decoupled_weight_decay,
)

# precision
from lion_optax._src.precision import (
    Int8Momentum,
    QuantizedMomentum,
    RoundUpdatesToParamsState,
    round_updates_to_params,
    stochastic_round,
)

# constraints and monitors
# isort: split
from lion_optax._src.constraints import ConstraintDiagnostics as ConstraintDiagnostics
from lion_optax._src.constraints import constraint_diagnostics as constraint_diagnostics
from lion_optax._src.kappa import resolve_kappa as resolve_kappa
from lion_optax._src.monitors import SignMonitorState as SignMonitorState
from lion_optax._src.monitors import monitor_signs as monitor_signs
from lion_optax._src.monitors import sign_agreement as sign_agreement
from lion_optax._src.monitors import sign_flip_fraction as sign_flip_fraction

# distribution
# isort: split
from lion_optax._src.distributed import SignLayout as SignLayout
from lion_optax._src.distributed import aggregate_signs as aggregate_signs
from lion_optax._src.distributed import distributed_init as distributed_init
from lion_optax._src.distributed import distributed_lion as distributed_lion
from lion_optax._src.distributed import sign_layout as sign_layout
from lion_optax._src.distributed import worker_state_specs as worker_state_specs
from lion_optax._src.sharding import Collective as Collective
from lion_optax._src.sharding import bytes_sent_per_device as bytes_sent_per_device
from lion_optax._src.sharding import hlo_collectives as hlo_collectives
from lion_optax._src.sharding import shard_optimizer_state as shard_optimizer_state
from lion_optax._src.sharding import tree_bytes as tree_bytes
from lion_optax._src.sharding import zeros_like_sharded as zeros_like_sharded

# checkpoint
from lion_optax._src.checkpoint import CheckpointMismatchError as CheckpointMismatchError
from lion_optax._src.checkpoint import latest_step as latest_step
from lion_optax._src.checkpoint import restore_checkpoint as restore_checkpoint
from lion_optax._src.checkpoint import save_checkpoint as save_checkpoint

__version__ = '0.1.0'

__all__ = [
    'AddDecoupledWeightDecayState',
    'ConstraintDiagnostics',
    'Kappa',
    'LionHyperparameters',
    'ScaleByLionState',
    'SignMonitorState',
    'SkipNonfiniteState',
    'add_decoupled_weight_decay',
    'adamw_to_lion',
    'clip_kappa',
    'constraint_diagnostics',
    'custom_kappa',
    'l2_kappa',
    'lion',
    'lp_kappa',
    'monitor_signs',
    'resolve_kappa',
    'scale_by_lion',
    'sign_agreement',
    'sign_flip_fraction',
    'sign_kappa',
    'skip_nonfinite',
    'tanh_kappa',
    'warmup_cosine_schedule',
]
