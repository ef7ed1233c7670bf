"""Property tests over random pytrees (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import lion_optax

# No magnitudes below 1e-30: scaling them by 1e-3 would underflow to 0 (XLA:CPU
# flushes subnormals), which changes sign(g) and is not what the property is about.
finite = st.floats(-10.0, 10.0, allow_nan=False, width=32).filter(lambda x: x == 0 or abs(x) > 1e-30)


@st.composite
def trees(draw):
    """A dict of 1-3 leaves of random shapes with params and two gradients."""
    n_leaves = draw(st.integers(1, 3))
    params, grads_a, grads_b = {}, {}, {}
    for i in range(n_leaves):
        size = draw(st.integers(1, 6))
        params[f'x{i}'] = np.array(draw(st.lists(finite, min_size=size, max_size=size)), np.float32)
        grads_a[f'x{i}'] = np.array(draw(st.lists(finite, min_size=size, max_size=size)), np.float32)
        grads_b[f'x{i}'] = np.array(draw(st.lists(finite, min_size=size, max_size=size)), np.float32)
    return params, grads_a, grads_b


hyper = dict(
    learning_rate=st.floats(1e-5, 1.0),
    weight_decay=st.floats(0.0, 2.0),
    b1=st.floats(0.0, 1.0),
    b2=st.floats(0.0, 1.0),
)


@settings(max_examples=60, deadline=None)
@given(tree=trees(), **hyper)
def test_update_magnitude_is_bounded(tree, learning_rate, weight_decay, b1, b2):
    """|update| <= lr (1 + wd |theta|) element-wise, for two steps."""
    params, grads_a, grads_b = tree
    tx = lion_optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    state = tx.init(params)
    for grads in (grads_a, grads_b):
        updates, state = tx.update(grads, state, params)
        for name, u in updates.items():
            bound = learning_rate * (1.0 + weight_decay * np.abs(params[name]))
            assert np.all(np.abs(np.asarray(u)) <= bound * (1 + 1e-6) + 1e-30)
        params = optax.apply_updates(params, updates)


@settings(max_examples=60, deadline=None)
@given(tree=trees(), scale=st.floats(1e-3, 1e3), **hyper)
def test_first_update_is_invariant_to_gradient_scale(tree, scale, learning_rate, weight_decay, b1, b2):
    """sign(c) with m = 0 is sign((1 - b1) g): scaling g by c > 0 changes nothing."""
    params, grads, _ = tree
    tx = lion_optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
    state = tx.init(params)
    plain, _ = tx.update(grads, state, params)
    scaled, _ = tx.update(jax.tree.map(lambda g: jnp.float32(scale) * g, grads), state, params)
    for name in plain:
        np.testing.assert_array_equal(plain[name], scaled[name])
