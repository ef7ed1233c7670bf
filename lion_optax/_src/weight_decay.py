"""Decoupled weight decay, in the two conventions Lion users meet."""

import typing
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lion_optax._src import options, validation
from lion_optax._src.numerics import compute_dtype

WeightDecayConventionName = Literal['paper', 'fully_decoupled']
WEIGHT_DECAY_CONVENTIONS: tuple[str, ...] = typing.get_args(WeightDecayConventionName)


class FullyDecoupled(NamedTuple):
    r"""The ``'fully_decoupled'`` weight decay, with its reference learning rate.

    The decay follows only the *shape* of the learning-rate schedule,
    :math:`\theta \leftarrow \theta (1 - (\eta_t/\eta_{\mathrm{ref}})\lambda)
    - \eta_t u_t` (lion-pytorch's ``decoupled_weight_decay``, llm-foundry,
    Loshchilov & Hutter's AdamW). ``'fully_decoupled'`` is ``FullyDecoupled()``.

    Attributes:
      reference_learning_rate: :math:`\eta_{\mathrm{ref}}` (usually the
        schedule's peak), > 0; None takes a constant learning rate (and is
        refused with a schedule).

    Example:
      >>> import optax, lion_optax
      >>> schedule = optax.cosine_decay_schedule(1e-4, 1000)
      >>> tx = lion_optax.lion(schedule, weight_decay=0.1, weight_decay_convention=
      ...     lion_optax.FullyDecoupled(reference_learning_rate=1e-4))
    """

    reference_learning_rate: float | None = None


# What every weight_decay_convention= option accepts.
WeightDecayConvention = WeightDecayConventionName | FullyDecoupled


def resolve_convention(
    convention: Any, reference_learning_rate: float | None = None
) -> tuple[str, float | None]:
    """``(name, reference learning rate)`` of a convention given as a name or :class:`FullyDecoupled`.

    ``reference_learning_rate`` is the separate keyword of lion_optax 0.2
    (deprecated); it may only go with ``'fully_decoupled'``.
    """
    if isinstance(convention, FullyDecoupled):
        if reference_learning_rate is not None:
            raise ValueError(
                'reference_learning_rate and FullyDecoupled(...) both set the reference: '
                f'pass only FullyDecoupled(reference_learning_rate={reference_learning_rate!r}).'
            )
        return 'fully_decoupled', convention.reference_learning_rate
    validation.check_choice(
        'weight_decay_convention', convention, (*WEIGHT_DECAY_CONVENTIONS, 'FullyDecoupled(...)')
    )
    return convention, reference_learning_rate


# The state of a weight-decay schedule, ``AddDecoupledWeightDecayState(count)``:
# optax.add_decayed_weights' own class (optax does not export it; its init
# returns one), so that lion()'s state is optax.lion's. A constant weight decay
# keeps optax.EmptyState, as optax does. (eval_shape: importing lion_optax must not
# start a JAX backend, so that jax_num_cpu_devices can still be set after it.)
AddDecoupledWeightDecayState = type(
    jax.eval_shape(optax.add_decayed_weights(lambda count: 0.0).init, {})
)


def check_convention(convention: str, reference_learning_rate: float | None) -> None:
    """Refuses an unknown convention, or a reference learning rate that does not fit it."""
    validation.check_choice('weight_decay_convention', convention, WEIGHT_DECAY_CONVENTIONS)
    if convention == 'fully_decoupled':
        if reference_learning_rate is None:
            raise ValueError(
                "weight_decay_convention='fully_decoupled' scales the decay by lr_t / lr_ref "
                'and needs lr_ref (usually the peak learning rate of your schedule): pass '
                'weight_decay_convention=FullyDecoupled(reference_learning_rate=lr_ref), or '
                "use weight_decay_convention='paper'."
            )
        validation.check_positive('FullyDecoupled(reference_learning_rate=...)',
                                  reference_learning_rate)
    elif reference_learning_rate is not None:
        raise ValueError(
            "reference_learning_rate is only used with weight_decay_convention='fully_decoupled'"
            f'; got it with weight_decay_convention={convention!r}. Remove it, or pass '
            'weight_decay_convention=FullyDecoupled(reference_learning_rate=...).'
        )


def convention_of(
    weight_decay_convention: Any,
    *,
    convention: Any = None,
    reference_learning_rate: float | None = None,
    stacklevel: int = 4,
) -> tuple[str, float | None]:
    """``(name, reference)`` of the option, folding in lion_optax 0.2's keywords (deprecated).

    ``convention`` (0.2's name of ``weight_decay_convention`` in
    :func:`add_decoupled_weight_decay` and :func:`constraint_diagnostics`) and
    ``reference_learning_rate`` each warn with what to write instead.
    """
    if options.deprecated('convention', convention, 'weight_decay_convention=...',
                          stacklevel=stacklevel) is not None:
        if weight_decay_convention != 'paper':
            raise ValueError(
                'convention and weight_decay_convention both set the convention: pass only '
                f'weight_decay_convention={convention!r}.'
            )
        weight_decay_convention = convention
    options.deprecated(
        'reference_learning_rate',
        reference_learning_rate,
        'weight_decay_convention=FullyDecoupled(reference_learning_rate=...)',
        stacklevel=stacklevel,
    )
    name, reference = resolve_convention(weight_decay_convention, reference_learning_rate)
    check_convention(name, reference)
    return name, reference


def paper_equivalent_decay(
    weight_decay: Any, convention: str, reference_learning_rate: float | None
) -> Any:
    """The decay :math:`\\lambda` of the paper convention that gives the same step.

    ``'fully_decoupled'`` decays by :math:`(\\eta_t/\\eta_{\\mathrm{ref}})\\,w`,
    which is the paper's :math:`\\eta_t \\lambda` with :math:`\\lambda =
    w / \\eta_{\\mathrm{ref}}`.
    """
    if convention == 'fully_decoupled':
        return weight_decay / reference_learning_rate
    return weight_decay


def add_decoupled_weight_decay(
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    *,
    weight_decay_convention: WeightDecayConvention = 'paper',
    mask: Any | Callable[[optax.Params], Any] | None = None,
    convention: WeightDecayConvention | None = None,
    reference_learning_rate: float | None = None,
) -> optax.GradientTransformation:
    r"""Adds decoupled weight decay to a direction, before the learning rate.

    Placed between :func:`scale_by_lion` and ``optax.scale_by_learning_rate``
    (as :func:`lion` does), it gives the parameter step

    .. math::

      \text{paper:} \quad
        \theta_{t+1} = \theta_t - \eta_t\,(u_t + \lambda_t \theta_t)
      \qquad
      \text{fully\_decoupled:} \quad
        \theta_{t+1} = \theta_t - \eta_t u_t
        - \frac{\eta_t}{\eta_{\mathrm{ref}}}\,\lambda_t \theta_t

    - ``'paper'``: the decay is multiplied by the (scheduled) learning rate
      :math:`\eta_t`: Chen et al. (2023), ``optax.lion``, keras, timm.
    - ``'fully_decoupled'``: the decay follows only the schedule's *shape*
      :math:`\eta_t / \eta_{\mathrm{ref}}` (Loshchilov and Hutter's original
      AdamW; lion-pytorch's ``decoupled_weight_decay=True``, llm-foundry). With
      a constant learning rate each step multiplies the weights by
      :math:`1 - \lambda`, whatever the learning rate.

    The decay uses :math:`\theta_t` before the step.

    Args:
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule of the step.
      weight_decay_convention: ``'paper'`` or
        ``FullyDecoupled(reference_learning_rate)`` (:math:`\eta_{\mathrm{ref}}`,
        usually the peak learning rate, > 0).
      mask: a pytree of booleans with the params' structure (or a prefix), or
        a callable returning one from the params; ``False`` leaves (biases,
        norm scales) get no decay.
      convention: deprecated: write ``weight_decay_convention=...``.
      reference_learning_rate: deprecated: write
        ``weight_decay_convention=FullyDecoupled(reference_learning_rate=...)``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params`` unless
      ``weight_decay`` is the constant 0 (then it passes updates through).

    Example:
      >>> import jax.numpy as jnp
      >>> import lion_optax
      >>> tx = lion_optax.add_decoupled_weight_decay(0.1)
      >>> params = {'w': jnp.array([2.0])}
      >>> updates, _ = tx.update({'w': jnp.array([1.0])}, tx.init(params), params)
      >>> updates['w']
      Array([1.2], dtype=float32)
    """
    validation.check_nonnegative('weight_decay', weight_decay)
    name, reference_learning_rate = convention_of(
        weight_decay_convention, convention=convention,
        reference_learning_rate=reference_learning_rate,
    )
    if mask is not None and not callable(mask):
        if not jax.tree.leaves(mask):
            raise ValueError('mask is an empty tree; pass None to decay every leaf.')
        validation.check_mask(mask, who='add_decoupled_weight_decay')
    checked_mask = None
    if mask is not None:
        given = mask

        def checked_mask(params: Any) -> Any:
            """The mask, checked against the tree optax.masked applies it to (the params in
            init, the updates in update), so that a wrong structure is named, not JAX's
            raw pytree error. A callable's result is checked when it is called."""
            tree = given(params) if callable(given) else given
            validation.check_mask(tree, who='add_decoupled_weight_decay', params=params)
            return tree

    def rate(count: jax.Array | None) -> Any:
        value = weight_decay(count) if count is not None else weight_decay
        return paper_equivalent_decay(value, name, reference_learning_rate)

    scheduled = callable(weight_decay)
    no_decay = not scheduled and validation.concrete_float(weight_decay) == 0.0

    # States are annotated optax.OptState: AddDecoupledWeightDecayState is a class found at
    # import time (optax does not export it), which a type checker cannot name.
    def init_fn(params: optax.Params) -> optax.OptState:
        del params
        if scheduled:
            return AddDecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, optax.OptState]:
        if no_decay:  # nothing to add: do not read the parameters at all
            return updates, state
        if params is None:
            raise ValueError(
                'add_decoupled_weight_decay needs the parameters: call '
                'update(grads, state, params).'
            )
        validation.check_matching_trees(
            'update', updates, params, 'parameters', who='add_decoupled_weight_decay'
        )
        decay = rate(state.count if scheduled else None)

        def add(u: jax.Array, p: jax.Array) -> jax.Array:
            # jnp.asarray: parameters may be Python scalars or NumPy arrays (as under jit).
            u, p = jnp.asarray(u), jnp.asarray(p)
            dtype = compute_dtype(u, p)
            return (u.astype(dtype) + decay * p.astype(dtype)).astype(u.dtype)

        if scheduled:
            state = AddDecoupledWeightDecayState(optax.safe_increment(state.count))
        return jax.tree.map(add, updates, params), state

    transformation = optax.GradientTransformation(init_fn, update_fn)
    if checked_mask is not None:
        return optax.masked(transformation, checked_mask)
    return transformation
