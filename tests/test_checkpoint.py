"""Checkpoints: exact round trips, refusal of mismatched targets, and resume.

The resume test trains half the steps here and saves; a child process (this file
run as a script) restores, trains the rest and saves; the result must equal this
process's uninterrupted run bit for bit, for float32, bfloat16 and int8 momentum.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax import CheckpointMismatchError, latest_step, restore_checkpoint, save_checkpoint

TOTAL_STEPS = 6
SPLIT_STEP = 3


def _assert_trees_bitwise_equal(a, b):
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(x)).view(np.uint8),
            np.atleast_1d(np.asarray(y)).view(np.uint8),
            jax.tree_util.keystr(path),
        )


def _mixed_tree():
    rng = np.random.default_rng(0)
    return {
        'f32': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        'bf16': jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        'int8': jnp.asarray(rng.integers(-127, 128, size=(2, 4)), jnp.int8),
        'count': jnp.int32(7),
        'nested': (jnp.float32(np.pi), {'key': jax.random.key(42)}),
    }


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    tree = _mixed_tree()
    save_checkpoint(tmp_path, 5, tree)
    restored, step = restore_checkpoint(tmp_path, tree)
    assert step == 5
    _assert_trees_bitwise_equal(restored, tree)


def test_restore_into_abstract_target(tmp_path):
    tree = _mixed_tree()
    save_checkpoint(tmp_path, 1, tree)
    restored, _ = restore_checkpoint(tmp_path, jax.eval_shape(lambda: tree))
    _assert_trees_bitwise_equal(restored, tree)


def test_python_scalar_leaves_round_trip(tmp_path):
    save_checkpoint(tmp_path, 0, {'step': 3, 'lr': 0.5})
    restored, _ = restore_checkpoint(tmp_path, {'step': 0, 'lr': 0.0})
    assert int(restored['step']) == 3 and float(restored['lr']) == 0.5


def test_lion_state_round_trip(tmp_path):
    params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
    tx = lion_optax.lion(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.sin, params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = {'params': params, 'opt_state': opt_state}
    save_checkpoint(tmp_path, 1, state)
    fresh = {'params': params, 'opt_state': tx.init(params)}
    restored, _ = restore_checkpoint(tmp_path, fresh)
    _assert_trees_bitwise_equal(restored, state)


def test_dtype_mismatch_is_refused_with_the_leaf_named(tmp_path):
    params = {'w': jnp.ones((4, 2))}
    saved = {'params': params, 'opt_state': lion_optax.lion(1e-3).init(params)}
    save_checkpoint(tmp_path, 2, saved)
    bf16 = lion_optax.lion(1e-3, mu_dtype=jnp.bfloat16)
    target = {'params': params, 'opt_state': bf16.init(params)}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, target)
    message = str(info.value)
    assert "mu['w']: checkpoint has float32[4,2], target expects bfloat16[4,2]" in message
    assert '1 difference' in message
    assert 'Nothing was restored' in message


def test_shape_mismatch_is_refused(tmp_path):
    save_checkpoint(tmp_path, 0, {'w': jnp.zeros((3, 2))})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"\['w'\]: checkpoint has float32\[3,2\], "
        r'target expects float32\[2,3\]',
    ):
        restore_checkpoint(tmp_path, {'w': jnp.zeros((2, 3))})


def test_other_optimizer_state_is_refused(tmp_path):
    params = {'w': jnp.ones(3)}
    save_checkpoint(tmp_path, 0, {'opt_state': optax.lion(1e-3).init(params)})
    target = {'opt_state': lion_optax.lion(1e-3).init(params)}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, target)
    message = str(info.value)
    assert 'in the checkpoint only' in message and 'in the target only' in message
    assert '.skipped_steps: in the target only, int32[]' in message


def test_same_leaves_in_another_tree_type_are_refused(tmp_path):
    save_checkpoint(tmp_path, 0, {'a': jnp.ones(2), 'b': jnp.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match='in the checkpoint only'):
        restore_checkpoint(tmp_path, (jnp.ones(2), jnp.zeros(2)))


def test_steps_latest_overwrite_and_missing(tmp_path):
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
        restore_checkpoint(tmp_path, {'x': jnp.zeros(())})
    for step in (1, 10, 2):
        save_checkpoint(tmp_path, step, {'x': jnp.float32(step)})
    assert latest_step(tmp_path) == 10
    restored, step = restore_checkpoint(tmp_path, {'x': jnp.float32(0)})
    assert (step, float(restored['x'])) == (10, 10.0)
    restored, step = restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)
    assert (step, float(restored['x'])) == (2, 2.0)
    with pytest.raises(FileNotFoundError, match='step 3'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=3)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_checkpoint(tmp_path, 2, {'x': jnp.float32(-1)})
    save_checkpoint(tmp_path, 2, {'x': jnp.float32(-1)}, overwrite=True)
    assert float(restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)[0]['x']) == -1.0


@pytest.mark.parametrize('bad', ['a string', object()])
def test_non_array_leaves_are_refused(tmp_path, bad):
    with pytest.raises(TypeError, match=r"Leaf \['name'\] is a"):
        save_checkpoint(tmp_path, 0, {'name': bad})


def test_bad_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match='step must be an int >= 0'):
        save_checkpoint(tmp_path, -1, {'x': jnp.zeros(())})


def test_zero_size_leaves_round_trip(tmp_path):
    tree = {
        'empty': jnp.zeros((0, 3), jnp.bfloat16),
        'keys': jax.random.split(jax.random.key(1), 0),
        'full': jnp.arange(4, dtype=jnp.int8),
    }
    save_checkpoint(tmp_path, 0, tree)
    restored, _ = restore_checkpoint(tmp_path, jax.eval_shape(lambda: tree))
    _assert_trees_bitwise_equal(restored, tree)
    restored, _ = restore_checkpoint(tmp_path, tree)  # onto the leaves' shardings
    _assert_trees_bitwise_equal(restored, tree)
    assert restored['empty'].sharding.is_equivalent_to(tree['empty'].sharding, 2)
    # Nothing but zero-size leaves, and no leaves at all.
    save_checkpoint(tmp_path, 1, {'e': jnp.zeros((2, 0))})
    restored, _ = restore_checkpoint(tmp_path, {'e': jnp.zeros((2, 0))}, step=1)
    _assert_trees_bitwise_equal(restored, {'e': jnp.zeros((2, 0))})
    save_checkpoint(tmp_path, 2, {})
    assert restore_checkpoint(tmp_path, {}, step=2) == ({}, 2)
    assert sorted(os.listdir(tmp_path)) == ['0', '1', '2']


def test_unstorable_leaf_is_refused_before_anything_is_written(tmp_path):
    save_checkpoint(tmp_path, 1, {'x': jnp.ones(2)})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    bad = {'x': jnp.ones(2), 'packed': jnp.ones(4, jnp.uint4)}
    with pytest.raises(TypeError, match=r"Leaf \['packed'\] has dtype uint4.*nothing was saved"):
        save_checkpoint(tmp_path, 2, bad)
    with pytest.raises(TypeError, match='uint4'):
        save_checkpoint(tmp_path, 1, bad, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before


# ---------------------------------------------------------------------------
# Resume in a new process, bit for bit.
# ---------------------------------------------------------------------------


def _variants():
    variants = {
        'float32': (jnp.float32, dict()),
        'bfloat16': (jnp.bfloat16, dict(mu_dtype=jnp.bfloat16)),
    }
    if hasattr(lion_optax, 'Int8Momentum'):
        # Small blocks and no size threshold so that every leaf is quantised.
        int8 = lion_optax.Int8Momentum(block_size=16, min_quantized_size=0)
        variants['int8'] = (jnp.float32, dict(mu_dtype=int8))
    return variants


def _setup(variant):
    dtype, options = _variants()[variant]
    rng = np.random.default_rng(1)
    params = {
        'w1': jnp.asarray(rng.normal(size=(8, 32)) / 3, dtype),
        'b1': jnp.zeros((32,), dtype),
        'w2': jnp.asarray(rng.normal(size=(32, 1)) / 6, dtype),
    }
    tx = lion_optax.lion(
        lion_optax.warmup_cosine_schedule(3e-2, TOTAL_STEPS), weight_decay=0.1, **options
    )
    return params, tx


def _batch(step):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (16, 8))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@functools.cache
def _step_fn(variant):
    _, tx = _setup(variant)

    @jax.jit
    def step_fn(state):
        x, y = _batch(state['step'])

        def loss(params):
            hidden = jnp.tanh(x.astype(params['w1'].dtype) @ params['w1'] + params['b1'])
            return jnp.mean((hidden @ params['w2'] - y) ** 2)

        grads = jax.grad(loss)(state['params'])
        updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
        return {
            'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state,
            'step': state['step'] + 1,
        }

    return step_fn


def _train(variant, state, steps):
    for _ in range(steps):
        state = _step_fn(variant)(state)
    return state


def _fresh_state(variant):
    params, tx = _setup(variant)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}


def _resume_in_child(directory):
    """Runs in a new process: restores each variant's half-way checkpoint, finishes, saves."""
    for variant in _variants():
        folder = os.path.join(directory, variant)
        state, step = restore_checkpoint(folder, _fresh_state(variant))
        assert step == SPLIT_STEP == int(state['step'])
        save_checkpoint(folder, TOTAL_STEPS, _train(variant, state, TOTAL_STEPS - step))


def test_resume_in_new_process_is_bitwise_identical(tmp_path):
    references = {}
    for variant in _variants():
        state = _train(variant, _fresh_state(variant), SPLIT_STEP)
        save_checkpoint(tmp_path / variant, SPLIT_STEP, state)
        references[variant] = _train(variant, state, TOTAL_STEPS - SPLIT_STEP)
    # The child must import the same lion_optax as this process.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lion_optax.__file__)))
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, env=env, timeout=300)
    for variant, reference in references.items():
        resumed, step = restore_checkpoint(tmp_path / variant, _fresh_state(variant))
        assert step == TOTAL_STEPS
        _assert_trees_bitwise_equal(resumed, reference)
        # The run really moved: a resume that restored nothing could not match.
        assert not np.array_equal(resumed['params']['w1'], _fresh_state(variant)['params']['w1'])


if __name__ == '__main__':
    _resume_in_child(sys.argv[1])
