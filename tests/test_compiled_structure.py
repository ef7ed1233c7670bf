"""The compiled step on real models' trees: size linear in the leaves (no timing).

Compile time on XLA:CPU follows the optimised program's size. A step whose size
grows faster than its number of leaves (a global scalar, such as the
finiteness flag or a global norm, whose arithmetic XLA copies into every
consumer) compiles for minutes on a 48-block model. These tests count the
instructions of the optimised HLO for GPT-shaped trees of 2 and 8 blocks (28
and 100 leaves) and a ViT-shaped tree; ``python -m benchmarks.compile_time``
measures the seconds.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import lion_optax
from benchmarks._model_trees import gpt_tree, vit_tree

# Compiles GPT trees of 12 to 48 blocks for every configuration.
pytestmark = pytest.mark.slow

CONFIGS = {
    'default': {},
    'bf16': dict(mu_dtype=jnp.bfloat16),
    'int8': dict(mu_dtype='int8'),
    'cautious': dict(cautious=True),
    'skip_step': dict(nonfinite='skip_step'),
    'l2_global': dict(kappa='l2_global'),
}
TREES = {'gpt': gpt_tree, 'vit': vit_tree}


@functools.cache
def instructions(config: str, tree: str, blocks: int) -> int:
    """Lines of the optimised HLO of lion(**CONFIGS[config]) ('optax': optax.lion)."""
    if config == 'optax':
        tx = optax.lion(1e-4, weight_decay=0.1)
    else:
        tx = lion_optax.lion(1e-4, weight_decay=0.1, **CONFIGS[config])
    params = TREES[tree](blocks)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step).lower(params, tx.init(params), params).compile()
    return compiled.as_text().count('\n')


def leaves(params) -> int:
    return len(jax.tree.leaves(params))


@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_compiled_step_grows_linearly_with_the_leaves(config):
    growth = instructions(config, 'gpt', 8) / instructions(config, 'gpt', 2)
    # 100 / 28 = 3.57 leaves; a program quadratic in the leaves would grow ~13x
    # (measured 8.5x with the finiteness flag summed in plain scalar arithmetic).
    assert growth <= 1.1 * leaves(gpt_tree(8)) / leaves(gpt_tree(2)), growth


@pytest.mark.parametrize('config', ['default', 'bf16', 'int8', 'cautious'])
@pytest.mark.parametrize('tree', sorted(TREES))
def test_compiled_step_per_leaf_is_bounded_by_optax(config, tree):
    """Instructions against optax.lion's on the same tree (the bound is the
    measured size plus a margin, so that growth is noticed)."""
    ours, theirs = instructions(config, tree, 2), instructions('optax', tree, 2)
    bound = {'default': 1.3, 'bf16': 2.4, 'int8': 2.7, 'cautious': 3.1}[config]
    assert ours <= bound * theirs, ours / theirs
