"""``PyTree``, the annotation for a pytree, defined once for every module that takes one.

JAX has no type for "a pytree of arrays", so it is ``Any``; the name says what is meant.
(This module is not called ``types``: pytest imports the modules of ``lion_optax/_src``
for their doctests under their file names, and ``types`` is the standard library's.)
"""

from typing import Any

PyTree = Any
