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

# constraints and monitors

# distribution

# checkpoint

__version__ = '0.1.0'

__all__ = [
    'AddDecoupledWeightDecayState',
    'Kappa',
    'LionHyperparameters',
    'ScaleByLionState',
    'SkipNonfiniteState',
    'add_decoupled_weight_decay',
    'adamw_to_lion',
    'clip_kappa',
    'custom_kappa',
    'l2_kappa',
    'lion',
    'lp_kappa',
    'scale_by_lion',
    'sign_kappa',
    'skip_nonfinite',
    'tanh_kappa',
    'warmup_cosine_schedule',
]
