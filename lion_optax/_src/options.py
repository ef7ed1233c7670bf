"""Lion's options as values: one typed value per idea, and the string modes.

Options that only make sense together are one value each, as optax does with
``MuonDimensionNumbers``: ``cautious=Cautious(eps=1e-3)``,
``diagnostics=Diagnostics(max_consecutive_bad_steps=100)``, the
``'fully_decoupled'`` weight decay with its reference learning rate
(:class:`FullyDecoupled`, in :mod:`weight_decay`) and the rounding with its
seed (:class:`Rounding`, in :mod:`rounding`). None of them is a number, so
``optax.inject_hyperparams`` leaves them static. Every tuple of accepted
strings is derived from its ``Literal``, so the two never drift.
"""

import typing
import warnings
from typing import Any, Literal, NamedTuple, TypeVar

from lion_optax._src import validation

Nonfinite = Literal['zero', 'skip_step', 'propagate']
NONFINITE_MODES: tuple[str, ...] = typing.get_args(Nonfinite)
NonfiniteElements = Literal['zero', 'propagate']
NONFINITE_ELEMENTS: tuple[str, ...] = typing.get_args(NonfiniteElements)
InvalidHyperparameters = Literal['skip_step', 'raise']
INVALID_HYPERPARAMETER_MODES: tuple[str, ...] = typing.get_args(InvalidHyperparameters)

T = TypeVar('T')


def deprecated(name: str, value: T | None, instead: str, *, stacklevel: int = 3) -> T | None:
    """``value``, with a ``DeprecationWarning`` saying what to write instead when it was given."""
    if value is not None:
        warnings.warn(
            f'{name}=... is deprecated and will be removed: write {instead} instead.',
            DeprecationWarning,
            stacklevel=stacklevel,
        )
    return value


class Cautious(NamedTuple):
    r"""Cautious Lion (Liang et al. 2024): ``cautious=Cautious(eps=1e-3)``.

    Keeps the coordinates where the direction agrees with the gradient,
    :math:`\phi = \mathbb{1}[u g > 0]`, and rescales them per array by
    :math:`1 / (\mathrm{mean}(\phi) + \epsilon)`. ``cautious=True`` is
    ``Cautious()``.

    Attributes:
      eps: the :math:`\epsilon` of the normaliser, > 0; it caps the rescaling
        at ``1 / eps``.

    Example:
      >>> import lion_optax
      >>> tx = lion_optax.lion(1e-4, cautious=lion_optax.Cautious(eps=1e-2))
    """

    eps: float = 1e-3


def resolve_cautious(cautious: Any, eps: float | None = None) -> Cautious | None:
    """``cautious`` (False, True or a :class:`Cautious`) as a checked :class:`Cautious`, or None.

    ``eps`` is the deprecated ``cautious_eps`` keyword, which only goes with
    ``cautious=True``.
    """
    if isinstance(cautious, Cautious):
        if eps is not None:
            raise ValueError(
                'cautious_eps and cautious=Cautious(...) both set the epsilon: pass only '
                f'cautious=Cautious(eps={eps!r}).'
            )
        spec = cautious
    elif isinstance(cautious, bool):
        if not cautious:
            return None
        spec = Cautious() if eps is None else Cautious(eps=eps)
    else:
        raise TypeError(
            f'cautious must be True, False or lion_optax.Cautious(eps=...), got {cautious!r}.'
        )
    validation.check_positive('Cautious(eps=...)', spec.eps)
    if validation.concrete_float(spec.eps) is None:
        raise TypeError(
            f'Cautious(eps={spec.eps!r}) must be a Python number: it is fixed when the '
            'optimizer is built (it is not a hyperparameter to schedule).'
        )
    return Cautious(eps=float(spec.eps))


class Diagnostics(NamedTuple):
    """Counts of bad steps in :func:`lion`'s state: ``diagnostics=Diagnostics(...)``.

    ``diagnostics=True`` is ``Diagnostics()``. The counters
    (:class:`LionDiagnosticsState`) are appended after ``optax.lion``'s three
    states, so ``state[0].mu`` stays the momentum.

    Attributes:
      max_consecutive_bad_steps: raise ``FloatingPointError`` (through
        ``jax.debug.callback``) after more than this many bad steps in a row
        (non-finite gradients or invalid hyperparameters); None: never.

    Example:
      >>> import lion_optax
      >>> tx = lion_optax.lion(1e-4, diagnostics=lion_optax.Diagnostics(
      ...     max_consecutive_bad_steps=100))
    """

    max_consecutive_bad_steps: int | None = None


def resolve_diagnostics(diagnostics: Any, max_consecutive: int | None = None) -> Diagnostics | None:
    """``diagnostics`` (False, True or a :class:`Diagnostics`) as a checked value, or None.

    ``max_consecutive`` is the deprecated ``max_consecutive_bad_steps`` keyword.
    """
    if isinstance(diagnostics, Diagnostics):
        if max_consecutive is not None:
            raise ValueError(
                'max_consecutive_bad_steps and diagnostics=Diagnostics(...) both set the '
                'limit: pass only diagnostics=Diagnostics('
                f'max_consecutive_bad_steps={max_consecutive!r}).'
            )
        spec = diagnostics
    elif isinstance(diagnostics, bool):
        if not diagnostics:
            if max_consecutive is not None:
                raise ValueError(
                    'max_consecutive_bad_steps counts bad steps in the diagnostics state: '
                    f'pass diagnostics=Diagnostics(max_consecutive_bad_steps={max_consecutive!r}).'
                )
            return None
        spec = Diagnostics(max_consecutive_bad_steps=max_consecutive)
    else:
        raise TypeError(
            'diagnostics must be True, False or lion_optax.Diagnostics(...), got '
            f'{diagnostics!r}.'
        )
    limit = spec.max_consecutive_bad_steps
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f'Diagnostics(max_consecutive_bad_steps={limit!r}) is invalid: expected an int '
            '>= 1 (or None for no limit).'
        )
    return spec
