"""Distributed Lion on several CPU devices; run as a subprocess by test_distributed.py.

Two modes:

- ``python _multidevice_distributed.py checks OUT.json``: one process, 8 CPU
  devices. Runs Distributed Lion against fixed per-worker gradients, compiles
  the steps to read their collectives, trains a small model for 20 steps, and
  writes every number the tests assert on to OUT.json.
- ``python _multidevice_distributed.py worker OUT.json PROCESS_ID NUM_PROCESSES PORT``:
  one of several processes (8 / NUM_PROCESSES devices each) joined with
  ``jax.distributed`` over loopback with gloo collectives; trains the same
  model for the same 20 steps and writes its final parameters.

The assertions live in test_distributed.py; this file only computes.
"""

from __future__ import annotations

import json
import sys

WORKERS = 8


def _setup(local_devices: int) -> None:
    import jax

    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', local_devices)


# --- the small model trained in both modes --------------------------------

STEPS = 20
FEATURES, HIDDEN, CLASSES, PER_WORKER = 12, 16, 3, 8


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    params = {
        'w1': rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / FEATURES**0.5,
        'b1': np.zeros((HIDDEN,), np.float32),
        'w2': rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / HIDDEN**0.5,
        'b2': np.zeros((CLASSES,), np.float32),
    }
    x = rng.normal(size=(STEPS, WORKERS * PER_WORKER, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=(STEPS, WORKERS * PER_WORKER)).astype(np.int32)
    return params, x, y


def train(mesh, method: str):
    """20 steps of Distributed Lion; returns the final params as NumPy arrays."""
    import functools

    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax

    params_np, x_np, y_np = _data()

    def global_array(value, spec):
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda index: value[index]
        )

    params = {k: global_array(v, P()) for k, v in params_np.items()}
    tx = lion_optax.distributed_lion(
        optax.linear_schedule(3e-2, 3e-3, STEPS), weight_decay=0.1, method=method
    )
    state, specs = lion_optax.distributed_init(tx, params, mesh)

    def loss_fn(p, x, y):
        hidden = jax.nn.relu(x @ p['w1'] + p['b1'])
        logits = hidden @ p['w2'] + p['b2']
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), specs, P('data'), P('data')),
        out_specs=(P(), specs),
    )
    def step(p, s, x, y):
        grads = jax.grad(loss_fn)(jax.lax.pcast(p, 'data', to='varying'), x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for t in range(STEPS):
        params, state = step(
            params, state, global_array(x_np[t], P('data')), global_array(y_np[t], P('data'))
        )
    return {k: np.asarray(v.addressable_data(0)).tolist() for k, v in params.items()}


# --- checks in one process -------------------------------------------------


def _abstract_step(mesh, tx, params, grads):
    """Compiles the Distributed Lion step without running ``init``."""
    import functools

    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lion_optax._src.distributed import worker_state_specs

    shapes = jax.eval_shape(tx.init, params)
    specs = worker_state_specs(shapes, 'data')
    n = mesh.shape['data']

    def abstract(leaf, spec):
        shape = (leaf.shape[0] * n, *leaf.shape[1:]) if leaf.ndim else ()
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    state = jax.tree.map(abstract, shapes, specs)

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), specs, P('data')), out_specs=(P(), specs)
    )
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return step.lower(params, state, grads).compile()


def _shard_map_step(mesh, tx, params, grads_shape):
    """A jitted ``(params, state, grads) -> (params, state)`` over the data axis."""
    import functools

    import jax
    import optax
    from jax.sharding import PartitionSpec as P

    import lion_optax

    state, specs = lion_optax.distributed_init(tx, params, mesh)

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), specs, P('data')),
        out_specs=(P(), specs),
    )
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    del grads_shape
    return step, state


def checks() -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax

    assert jax.device_count() == WORKERS, jax.devices()
    out: dict = {'device_count': jax.device_count()}
    rng = np.random.default_rng(1)
    shapes = {'w': (6, 5), 'b': (7,)}
    params_np = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    steps = 6
    # grads[t][k] has shape (WORKERS, *shape): worker i's gradient at step t.
    grads_np = [
        {k: rng.normal(size=(WORKERS, *s)).astype(np.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    # Exact zeros on some coordinates for every worker (sign(0) = 0 must hold).
    for g in grads_np:
        g['w'][:, 0, 0] = 0.0
    out['params0'] = {k: v.tolist() for k, v in params_np.items()}
    out['grads'] = [{k: v.tolist() for k, v in g.items()} for g in grads_np]

    def stacked(g, mesh):  # (WORKERS, *shape) -> global array sharded over workers
        return {
            k: jax.device_put(
                v.reshape(WORKERS * v.shape[1], *v.shape[2:]), NamedSharding(mesh, P('data'))
            )
            for k, v in g.items()
        }

    hyper = dict(learning_rate=0.05, b1=0.9, b2=0.99, weight_decay=0.2)
    meshes = {
        'explicit': jax.make_mesh((WORKERS,), ('data',)),
        'auto': jax.make_mesh((WORKERS,), ('data',), axis_types=(AxisType.Auto,)),
    }
    for mesh_name, method in (('explicit', 'vote'), ('explicit', 'average'), ('auto', 'vote')):
        mesh = meshes[mesh_name]
        if True:
            tx = lion_optax.distributed_lion(**hyper, method=method)
            params = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in params_np.items()}
            step, state = _shard_map_step(mesh, tx, params, None)
            history = []
            for g in grads_np:
                params, state = step(params, state, stacked(g, mesh))
                history.append({k: np.asarray(v).tolist() for k, v in params.items()})
            key = f'{mesh_name}_{method}'
            out[f'history_{key}'] = history
            out[f'param_sharding_{key}'] = {k: str(v.sharding.spec) for k, v in params.items()}
            mu = state[1].mu
            out[f'mu_shape_{key}'] = {k: list(v.shape) for k, v in mu.items()}
            out[f'mu_local_shape_{key}'] = {
                k: list(v.addressable_shards[0].data.shape) for k, v in mu.items()
            }

    # Identical gradients on every worker: equals plain Lion.
    mesh = meshes['explicit']

    def run_identical_gradients(tx, mu_dtype):
        """Every worker gets worker 0's gradient: max |tx's params - lion's| and tx's state."""
        plain = lion_optax.lion(**hyper, mu_dtype=mu_dtype)
        plain_update = jax.jit(plain.update)
        params = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in params_np.items()}
        step, state = _shard_map_step(mesh, tx, params, None)
        ref_params = {k: jnp.asarray(v) for k, v in params_np.items()}
        ref_state = plain.init(ref_params)
        diff = 0.0
        for g in grads_np:
            same = {k: np.broadcast_to(v[0], v.shape) for k, v in g.items()}
            params, state = step(params, state, stacked(same, mesh))
            updates, ref_state = plain_update(
                {k: v[0] for k, v in g.items()}, ref_state, ref_params
            )
            ref_params = jax.tree.map(jnp.add, ref_params, updates)
            diff = max(
                diff,
                max(float(np.max(np.abs(np.asarray(params[k]) - ref_params[k]))) for k in params),
            )
        return diff, state

    for method in ('vote', 'average'):
        tx = lion_optax.distributed_lion(**hyper, method=method)
        out[f'identical_grads_maxdiff_{method}'], _ = run_identical_gradients(tx, None)

    # A NaN on one worker skips the step on every worker (nonfinite='skip_step').
    tx = lion_optax.distributed_lion(**hyper, nonfinite='skip_step')
    params = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in params_np.items()}
    step, state = _shard_map_step(mesh, tx, params, None)
    bad = {k: v.copy() for k, v in grads_np[0].items()}
    bad['b'][3, 2] = np.nan
    new_params, new_state = step(params, state, stacked(bad, mesh))
    out['nan_params_unchanged'] = all(
        bool(np.array_equal(np.asarray(new_params[k]), params_np[k])) for k in params_np
    )
    out['nan_step_count'] = int(new_state[1].count)
    out['nan_mu_all_zero'] = all(bool(np.all(np.asarray(v) == 0)) for v in new_state[1].mu.values())

    # By default the bad element counts as zero on its worker only.
    tx = lion_optax.distributed_lion(**hyper)
    step, state = _shard_map_step(mesh, tx, params, None)
    new_params, _ = step(params, state, stacked(bad, mesh))
    out['nan_zero_params_finite'] = all(
        bool(np.isfinite(np.asarray(v)).all()) for v in new_params.values()
    )
    out['nan_zero_params_replicated'] = all(
        all(np.array_equal(np.asarray(s.data), np.asarray(v.addressable_shards[0].data))
            for s in v.addressable_shards)
        for v in new_params.values()
    )
    out['nan_zero_params_moved'] = any(
        not np.array_equal(np.asarray(new_params[k]), params_np[k]) for k in params_np
    )

    # bf16 and int8 momentum, one per worker; identical gradients give plain Lion.
    for mu_dtype in ('bfloat16', 'int8'):
        storage = jnp.bfloat16 if mu_dtype == 'bfloat16' else lion_optax.Int8Momentum(
            block_size=5, min_quantized_size=16
        )
        for method in ('vote', 'average'):
            tx = lion_optax.distributed_lion(**hyper, method=method, mu_dtype=storage)
            diff, state = run_identical_gradients(tx, storage)
            mu = state[1].mu['w']
            out[f'low_precision_{mu_dtype}_{method}'] = {
                'maxdiff_vs_lion': diff,
                'mu_dtype': str(mu.dtype),
                'mu_local_shape': list(mu.addressable_shards[0].data.shape),
            }

    # Traffic, from the compiled HLO of the optimizer step, against an fp32 all-reduce.
    big = {'w': np.zeros((192, 256), np.float32), 'b': np.zeros((256,), np.float32)}
    num_params = sum(v.size for v in big.values())
    out['traffic_num_params'] = num_params
    devices = jax.devices()
    for n in (2, 8):
        sub = jax.make_mesh((n,), ('data',), devices=devices[:n])
        params = {k: jax.device_put(v, NamedSharding(sub, P())) for k, v in big.items()}
        grads = {
            k: jax.device_put(
                np.zeros((n * v.shape[0], *v.shape[1:]), np.float32), NamedSharding(sub, P('data'))
            )
            for k, v in big.items()
        }

        allreduce = jax.jit(
            jax.shard_map(
                lambda g: jax.lax.psum(g, 'data'),
                mesh=sub,
                in_specs=P('data'),
                out_specs=P(),
            )
        )
        out[f'traffic_fp32_allreduce_{n}'] = lion_optax.hlo.bytes_sent_per_device(
            allreduce.lower(grads).compile()
        )
        tx = lion_optax.distributed_lion(0.01, nonfinite='skip_step')
        out[f'traffic_vote_skip_step_{n}'] = lion_optax.hlo.bytes_sent_per_device(
            _abstract_step(sub, tx, params, grads)
        )
        for method in ('vote', 'average'):
            tx = lion_optax.distributed_lion(0.01, method=method)
            compiled = _abstract_step(sub, tx, params, grads)
            collectives = lion_optax.hlo.collectives(compiled)
            out[f'traffic_{method}_{n}'] = lion_optax.hlo.bytes_sent_per_device(compiled)
            out[f'collectives_{method}_{n}'] = [
                [c.kind, c.buffer_bytes, c.group_size, c.bytes_sent] for c in collectives
            ]
            out[f'collective_dtypes_{method}_{n}'] = sorted(
                {c.hlo.split('=', 1)[1].split('[', 1)[0].strip(' (') for c in collectives}
            )
            layout = lion_optax.hlo.sign_layout(num_params, n, method)
            out[f'layout_bytes_{method}_{n}'] = layout.bytes_sent_per_device
            out[f'layout_fp32_{n}'] = layout.fp32_allreduce_bytes

    # Forgetting pcast (gradient w.r.t. invariant params) is refused.
    tx = lion_optax.distributed_lion(0.01)
    params = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in params_np.items()}
    state, specs = lion_optax.distributed_init(tx, params, mesh)
    x = jax.device_put(np.ones((WORKERS, 5), np.float32), NamedSharding(mesh, P('data')))

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), specs, P('data')), out_specs=(P(), specs)
    )
    def forgot_pcast(p, s, x):
        grads = jax.grad(lambda p: jnp.sum(x @ p['w'].T) + jnp.sum(p['b']))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    try:
        forgot_pcast(params, state, x)
        out['forgot_pcast_error'] = ''
    except ValueError as error:
        out['forgot_pcast_error'] = str(error)

    out['train_vote'] = train(mesh, 'vote')
    return out


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == 'checks':
        _setup(WORKERS)
        result = checks()
    elif mode == 'worker':
        process_id, num_processes, port = (int(a) for a in sys.argv[3:6])
        _setup(WORKERS // num_processes)
        import jax

        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=f'127.0.0.1:{port}',
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
        mesh = jax.make_mesh((WORKERS,), ('data',))
        result = {
            'process_index': jax.process_index(),
            'device_count': jax.device_count(),
            'local_device_count': jax.local_device_count(),
            'train_vote': train(mesh, 'vote'),
        }
        jax.distributed.shutdown()
    else:
        raise SystemExit(f'unknown mode {mode!r}')
    with open(path, 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main()
