"""Tests of Distributed Lion (lion_optax/_src/distributed.py).

In this process (one device): one worker against ``lion``, the validation (the
packing and the aggregation are in ``test_sign_aggregation.py``). In subprocesses: eight CPU devices under ``shard_map``
(``_multidevice_distributed.py checks``), and two processes of four devices
joined over loopback with gloo (``... worker``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lion_optax
from lion_optax._src.distributed import worker_state_specs

from _helpers import child_env, eight_device_checks

SCRIPT = Path(__file__).with_name('_multidevice_distributed.py')


# --- a NumPy reference of the paper's algorithm ----------------------------


def distributed_lion_numpy(params, grads, *, lr, b1, b2, wd, method):
    """Distributed Lion (Liu et al. 2024, Algorithm 1), worker by worker, in float32.

    ``grads`` is a list over steps of ``{name: array (workers, *shape)}``.
    Each worker i keeps m_i; sends s_i = sign(b1 m_i + (1 - b1) g_i);
    m_i <- b2 m_i + (1 - b2) g_i. The server's Delta is sign(sum_i s_i) (vote)
    or mean_i s_i (average); every worker applies
    theta <- theta - lr (Delta + wd theta).
    """
    theta = {k: np.asarray(v, np.float32).copy() for k, v in params.items()}
    workers = next(iter(grads[0].values())).shape[0]
    m = {k: np.zeros((workers, *v.shape), np.float32) for k, v in theta.items()}
    history = []
    for g in grads:
        for k in theta:
            gk = np.asarray(g[k], np.float32)
            s = np.sign((1 - b1) * gk + b1 * m[k])
            m[k] = (1 - b2) * gk + b2 * m[k]
            total = s.sum(axis=0)
            delta = np.sign(total) if method == 'vote' else total / np.float32(workers)
            theta[k] = theta[k] - np.float32(lr) * (delta + np.float32(wd) * theta[k])
        history.append({k: v.copy() for k, v in theta.items()})
    return history


# --- one worker equals Lion (shard_map over a one-device mesh) ---------------


def _one_worker_run(tx, params, grads):
    mesh = jax.make_mesh((1,), ('data',))
    state, specs = lion_optax.distributed_init(tx, params, mesh)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), specs, P('data')), out_specs=(P(), specs))
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    history = []
    for g in grads:
        params, state = step(params, state, jax.device_put(g, jax.NamedSharding(mesh, P('data'))))
        history.append(params)
    return history, state


@pytest.mark.parametrize('method', ['vote', 'average'])
def test_one_worker_equals_lion_with_schedule_mask_and_bf16_momentum(method):
    rng = np.random.default_rng(3)
    params = {
        'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    grads = [
        {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        for _ in range(6)
    ]
    grads[2]['b'] = grads[2]['b'].at[1].set(jnp.inf)  # a skipped step
    options = dict(
        learning_rate=optax.linear_schedule(0.1, 0.01, 6),
        b1=0.95,
        b2=0.98,
        mu_dtype=jnp.bfloat16,
        weight_decay=0.3,
        mask={'w': True, 'b': False},
    )
    history, state = _one_worker_run(
        lion_optax.distributed_lion(**options, method=method, nonfinite='skip_step'), params, grads
    )
    plain = lion_optax.lion(**options, nonfinite='skip_step')
    plain_state = plain.init(params)
    plain_update = jax.jit(plain.update)
    expected = params
    for got, g in zip(history, grads):
        updates, plain_state = plain_update(g, plain_state, expected)
        expected = optax.apply_updates(expected, updates)
        for k in params:
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6)
    assert state[1].mu['w'].dtype == jnp.bfloat16
    assert int(state[1].count) == 5  # the step with an Inf was skipped


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize('kappa', ['l2', 'clip', 'tanh', 'l2_global'])
def test_distributed_lion_refuses_non_sign_kappa(kappa):
    with pytest.raises(ValueError, match='sign'):
        lion_optax.distributed_lion(1e-3, kappa=kappa)


def test_distributed_lion_accepts_optax_name_for_sign():
    lion_optax.distributed_lion(1e-3, kappa='hard')


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(method='median'),
        dict(learning_rate=-1.0),
        dict(weight_decay_convention='adamw'),
        dict(
            learning_rate=optax.constant_schedule(1e-3), weight_decay_convention='fully_decoupled'
        ),
    ],
)
def test_distributed_lion_refuses_bad_options(kwargs):
    kwargs.setdefault('learning_rate', 1e-3)
    with pytest.raises(ValueError):
        lion_optax.distributed_lion(**kwargs)


def test_distributed_init_refuses_scalar_params_and_unknown_axis():
    mesh = jax.make_mesh((1,), ('data',))
    tx = lion_optax.distributed_lion(1e-3)
    with pytest.raises(ValueError, match=r'shape \(1,\)'):
        lion_optax.distributed_init(tx, {'s': jnp.ones(())}, mesh)
    with pytest.raises(ValueError, match='not an axis'):
        lion_optax.distributed_init(tx, {'w': jnp.ones(2)}, mesh, axis_name='batch')


def test_worker_state_specs_stack_arrays_and_replicate_scalars():
    tx = lion_optax.distributed_lion(1e-3)
    specs = worker_state_specs(jax.eval_shape(tx.init, {'w': jnp.ones((2, 3))}), 'dp')
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert P('dp') in leaves and P() in leaves
    assert specs[1].mu == {'w': P('dp')}
    assert specs[1].count == P()


# --- eight devices in a subprocess -------------------------------------------


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp('distributed') / 'checks.json'
    return eight_device_checks(SCRIPT, out, 'checks', str(out))


@pytest.mark.parametrize('run', ['explicit_vote', 'explicit_average', 'auto_vote'])
def test_eight_workers_match_numpy_reference(eight_devices, run):
    d = eight_devices
    assert d['device_count'] == 8
    method = run.split('_')[1]
    params = {k: np.asarray(v, np.float32) for k, v in d['params0'].items()}
    grads = [{k: np.asarray(v, np.float32) for k, v in g.items()} for g in d['grads']]
    expected = distributed_lion_numpy(
        params, grads, lr=0.05, b1=0.9, b2=0.99, wd=0.2, method=method
    )
    got = d[f'history_{run}']
    assert len(got) == len(expected) == 6
    for step_got, step_expected in zip(got, expected):
        for k in params:
            np.testing.assert_allclose(np.asarray(step_got[k]), step_expected[k], rtol=0, atol=2e-6)
    # The gradient is exactly 0 for every worker at w[0, 0]: only weight decay moves it.
    w00 = params['w'][0, 0] * (1 - 0.05 * 0.2) ** 6
    np.testing.assert_allclose(got[-1]['w'][0][0], w00, rtol=1e-5)


def test_eight_workers_keep_params_replicated_and_one_momentum_each(eight_devices):
    d = eight_devices
    for run in ('explicit_vote', 'explicit_average', 'auto_vote'):
        for spec in d[f'param_sharding_{run}'].values():
            assert 'data' not in spec, spec
        assert d[f'mu_shape_{run}'] == {'w': [48, 5], 'b': [56]}  # 8 workers stacked
        assert d[f'mu_local_shape_{run}'] == {'w': [6, 5], 'b': [7]}


@pytest.mark.parametrize('method', ['vote', 'average'])
def test_identical_gradients_on_every_worker_equal_lion(eight_devices, method):
    assert eight_devices[f'identical_grads_maxdiff_{method}'] <= 1e-6


def test_a_nonfinite_gradient_on_one_worker_skips_the_step_everywhere(eight_devices):
    """nonfinite='skip_step': one 4-byte all-reduce makes every worker skip."""
    d = eight_devices
    assert d['nan_params_unchanged']
    assert d['nan_step_count'] == 0
    assert d['nan_mu_all_zero']


def test_by_default_a_nonfinite_element_counts_as_zero_on_its_worker(eight_devices):
    """The default: that worker votes with its momentum alone there; params stay
    finite and identical on every worker, and no extra collective is needed."""
    d = eight_devices
    assert d['nan_zero_params_finite'] and d['nan_zero_params_replicated']
    assert d['nan_zero_params_moved']


@pytest.mark.parametrize('mu_dtype', ['bfloat16', 'int8'])
@pytest.mark.parametrize('method', ['vote', 'average'])
def test_low_precision_momentum_per_worker(eight_devices, mu_dtype, method):
    """bf16 and int8 momentum work in Distributed Lion: one momentum (codes and
    scales for int8) per worker, and identical gradients give plain Lion's numbers."""
    d = eight_devices[f'low_precision_{mu_dtype}_{method}']
    assert d['maxdiff_vs_lion'] <= 1e-6
    assert d['mu_dtype'] == ('int8' if mu_dtype == 'int8' else 'bfloat16')
    assert d['mu_local_shape'] == [6, 5]


@pytest.mark.parametrize('method', ['vote', 'average'])
def test_compiled_traffic_is_compressed_and_flat(eight_devices, method):
    d = eight_devices
    fp32 = d['traffic_fp32_allreduce_8']
    sent = d[f'traffic_{method}_8']
    np.testing.assert_allclose(fp32, 2 * 7 / 8 * 4 * d['traffic_num_params'])
    assert sent * 6 <= fp32, (sent, fp32)
    # Only packed uint32 words travel (the default non-finite guard sends nothing).
    assert d[f'collective_dtypes_{method}_8'] == ['u32']
    kinds = sorted(c[0] for c in d[f'collectives_{method}_8'])
    assert kinds == ['all-gather', 'all-to-all']
    for n in (2, 8):
        # The HLO agrees with the analysis of sign_layout.
        np.testing.assert_allclose(d[f'traffic_{method}_{n}'], d[f'layout_bytes_{method}_{n}'])
        np.testing.assert_allclose(d[f'traffic_fp32_allreduce_{n}'], d[f'layout_fp32_{n}'])
        # nonfinite='skip_step' adds one 4-byte all-reduce (the pmin of "all finite").
        pmin = 2 * (n - 1) / n * 4
        np.testing.assert_allclose(
            d[f'traffic_vote_skip_step_{n}'], d[f'layout_bytes_vote_{n}'] + pmin
        )
    # Per-device bytes grow only by the (n-1)/n factor from 2 to 8 workers for the
    # vote (an all_gather of everyone's signs would grow 7x).
    growth = d[f'traffic_{method}_8'] / d[f'traffic_{method}_2']
    assert growth < (2.0 if method == 'vote' else 3.0), growth


def test_gradient_of_replicated_params_is_refused_with_a_fix(eight_devices):
    message = eight_devices['forgot_pcast_error']
    assert 'all-reduce' in message and "pcast(params, 'data'" in message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_over_loopback_equal_one_process(eight_devices, tmp_path):
    port = _free_port()
    procs, outs, logs = [], [], []
    try:
        for pid in range(2):
            outs.append(tmp_path / f'worker{pid}.json')
            logs.append(open(tmp_path / f'worker{pid}.log', 'w'))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(SCRIPT),
                        'worker',
                        str(outs[-1]),
                        str(pid),
                        '2',
                        str(port),
                    ],
                    env=child_env(drop=('XLA_FLAGS',)),
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    tails = [(tmp_path / f'worker{i}.log').read_text()[-2000:] for i in range(2)]
    assert codes == [0, 0], tails
    expected = eight_devices['train_vote']
    start = {k: np.asarray(v) for k, v in distributed_params0().items()}
    for pid, path in enumerate(outs):
        got = json.loads(path.read_text())
        assert got['process_index'] == pid
        assert (got['device_count'], got['local_device_count']) == (8, 4)
        for k, v in expected.items():
            np.testing.assert_allclose(
                np.asarray(got['train_vote'][k]), np.asarray(v), rtol=0, atol=1e-6
            )
            assert np.max(np.abs(np.asarray(v) - start[k])) > 1e-2  # training moved it


def distributed_params0():
    """The small model's initial parameters, as the subprocess script makes them."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import _multidevice_distributed as script
    finally:
        sys.path.pop(0)
    return script._data()[0]
