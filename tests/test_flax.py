"""Lion in Flax: NNX ``nnx.Optimizer`` and linen ``TrainState`` loops, decay masks, resume.

These are the examples a Flax user copies: each trains a small model, checks that
the weight-decay mask built from the Flax parameter tree exempts biases and norm
scales, and checkpoints mid-run and resumes to the same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from flax.training import train_state

import lion_optax
from benchmarks.main_job._models import decay_mask
from lion_optax.checkpoint import restore_checkpoint, save_checkpoint

LR, WD = 1e-2, 0.5
# One optimizer object for every test: the jitted steps treat it as static, so a new
# object per test would recompile them.
TX = lion_optax.lion(LR, b1=0.9, b2=0.99, weight_decay=WD, mask=decay_mask)


def _data():
    x = jax.random.normal(jax.random.key(0), (64, 4))
    return x, jnp.tanh(x @ jnp.array([0.5, -1.0, 0.25, 1.0]))[:, None]


# ---------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.norm(self.hidden(x))))


def _nnx_setup():
    model = NNXModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    return model, optimizer


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_decay_mask_on_nnx_state():
    model, _ = _nnx_setup()
    mask = decay_mask(nnx.state(model, nnx.Param))
    assert nnx.to_pure_dict(mask) == {
        'hidden': {'kernel': True, 'bias': False},
        'norm': {'scale': False, 'bias': False},
        'out': {'kernel': True, 'bias': False},
    }


def test_nnx_optimizer_trains_inside_nnx_jit():
    model, optimizer = _nnx_setup()
    x, y = _data()
    losses = [float(_nnx_step(model, optimizer, x, y)) for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0]
    assert int(optimizer.step[...]) == 60


def test_nnx_mask_exempts_biases_and_norm_scales():
    """With a zero gradient Lion's direction is 0: only decayed leaves move, by lr*wd."""
    model, optimizer = _nnx_setup()
    model.norm.bias[...] = jnp.full((32,), 0.5)  # non-zero, so decay would show
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zeros)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for layer in ('hidden', 'out'):
        np.testing.assert_allclose(
            after[layer]['kernel'], before[layer]['kernel'] * (1 - LR * WD), rtol=1e-6
        )
        np.testing.assert_array_equal(after[layer]['bias'], before[layer]['bias'])
    np.testing.assert_array_equal(after['norm']['scale'], before['norm']['scale'])
    np.testing.assert_array_equal(after['norm']['bias'], before['norm']['bias'])


def test_nnx_checkpoint_resume_matches_uninterrupted(tmp_path):
    x, y = _data()
    model, optimizer = _nnx_setup()
    for _ in range(5):
        _nnx_step(model, optimizer, x, y)
    save_checkpoint(tmp_path, 5, {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)})
    for _ in range(5):
        _nnx_step(model, optimizer, x, y)

    resumed_model, resumed_optimizer = _nnx_setup()  # as a new process would
    target = {'model': nnx.state(resumed_model), 'optimizer': nnx.state(resumed_optimizer)}
    restored, step = restore_checkpoint(tmp_path, target)
    nnx.update(resumed_model, restored['model'])
    nnx.update(resumed_optimizer, restored['optimizer'])
    assert step == 5 and int(resumed_optimizer.step[...]) == 5
    for _ in range(5):
        _nnx_step(resumed_model, resumed_optimizer, x, y)
    expected = jax.tree.leaves(nnx.state(model))
    got = jax.tree.leaves(nnx.state(resumed_model))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------


class LinenModel(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.gelu(linen.LayerNorm()(linen.Dense(32)(x)))
        return linen.Dense(1)(x)


def _linen_state():
    model = LinenModel()
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=TX)


@jax.jit
def _linen_step(state, x, y):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def test_decay_mask_on_linen_params():
    assert decay_mask(_linen_state().params) == {
        'Dense_0': {'kernel': True, 'bias': False},
        'LayerNorm_0': {'scale': False, 'bias': False},
        'Dense_1': {'kernel': True, 'bias': False},
    }


def test_linen_train_state_trains():
    state = _linen_state()
    x, y = _data()
    losses = []
    for _ in range(60):
        state, loss = _linen_step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]


def test_linen_mask_exempts_biases_and_norm_scales():
    state = _linen_state()
    before = state.params
    after = state.apply_gradients(grads=jax.tree.map(jnp.zeros_like, before)).params
    for name in ('Dense_0', 'Dense_1'):
        np.testing.assert_allclose(
            after[name]['kernel'], before[name]['kernel'] * (1 - LR * WD), rtol=1e-6
        )
        np.testing.assert_array_equal(after[name]['bias'], before[name]['bias'])
    np.testing.assert_array_equal(after['LayerNorm_0']['scale'], before['LayerNorm_0']['scale'])


BF16_TX = lion_optax.lion(LR, weight_decay=WD, mask=decay_mask, mu_dtype=jnp.bfloat16)


@pytest.mark.parametrize('tx', [TX, BF16_TX], ids=['float32', 'bfloat16_momentum'])
def test_linen_checkpoint_resume_matches_uninterrupted(tmp_path, tx):
    x, y = _data()

    def fresh():
        state = _linen_state()
        return state.replace(tx=tx, opt_state=tx.init(state.params))

    state = fresh()
    for _ in range(4):
        state, _ = _linen_step(state, x, y)
    save_checkpoint(tmp_path, int(state.step), state)
    for _ in range(4):
        state, _ = _linen_step(state, x, y)

    resumed, step = restore_checkpoint(tmp_path, fresh())
    assert step == 4 and int(resumed.step) == 4
    for _ in range(4):
        resumed, _ = _linen_step(resumed, x, y)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
