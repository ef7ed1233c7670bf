"""Lion on a device mesh; run as a subprocess by conftest.py (sharding_on_eight_devices).

``python _multidevice_sharding.py OUT.json``: one process, 8 CPU devices. Runs
``lion_optax.lion`` on sharded parameters on a (data=2, model=4) mesh with Auto
and Explicit axes (with and without ``jax.set_mesh``), eagerly and jitted
``init``; every momentum storage (float32, bfloat16, float16, int8) under every
layout (FSDP, tensor-parallel, 2-D, replicated); the global-norm and cautious
variants; and the ZeRO-style ``shard_optimizer_state`` with float32 and int8
momentum. Writes every number the tests assert on to OUT.json; the assertions
live in test_sharding.py and test_zero.py.
"""

from __future__ import annotations

import contextlib
import json
import sys

STEPS = 3


def _setup() -> None:
    import jax

    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', 8)


def _spec(array) -> str:
    return str(getattr(array.sharding, 'spec', array.sharding))


def _same_sharding(a, b) -> bool:
    return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _describe(collectives) -> list:
    """[kind, buffer bytes, group size, result shape text] per collective."""
    return [
        [c.kind, c.buffer_bytes, c.group_size, c.hlo.split('=', 1)[1].split(c.kind)[0].strip()]
        for c in collectives
    ]


def _problem():
    import numpy as np
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    layout = {  # name: (shape, spec)
        'w': ((16, 8), P('data', 'model')),  # FSDP x tensor parallel
        'emb': ((12, 8), P(None, 'model')),  # tensor parallel
        'b': ((8,), P('model')),
        'r': ((3, 5), P()),  # replicated
    }
    params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in layout.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in layout.items()}
        for _ in range(STEPS)
    ]
    return layout, params, grads


_SINGLE_DEVICE_CACHE: dict = {}


def _lion_single_device():
    """``lion(1e-2, weight_decay=0.1)`` on one device over the problem (computed once)."""
    if not _SINGLE_DEVICE_CACHE:
        import lion_optax
        import lion_optax.checkpoint

        _, params, grads = _problem()
        tx = lion_optax.lion(1e-2, weight_decay=0.1)
        _SINGLE_DEVICE_CACHE['result'] = _single_device(tx, params, grads)
    return _SINGLE_DEVICE_CACHE['result']


def _single_device(tx, params, grads):
    import jax
    import numpy as np
    import optax

    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _mu(state):
    return state[0].mu  # lion's state is optax.lion's: (ScaleByLionState, ...)


def sharded_lion(mesh_kind: str) -> dict:
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding

    import lion_optax
    import lion_optax.checkpoint

    layout, params_np, grads_np = _problem()
    types = (AxisType.Auto,) * 2 if mesh_kind == 'auto' else (AxisType.Explicit,) * 2
    mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=types)
    context = jax.set_mesh(mesh) if mesh_kind == 'explicit_set_mesh' else contextlib.nullcontext()
    out: dict = {}
    tx = lion_optax.lion(1e-2, weight_decay=0.1)
    with context:

        def put(tree):
            return {
                k: jax.device_put(v, NamedSharding(mesh, layout[k][1])) for k, v in tree.items()
            }

        params = put(params_np)
        out['param_specs'] = {k: _spec(v) for k, v in params.items()}
        eager = tx.init(params)
        out['eager_init_same'] = {k: _same_sharding(_mu(eager)[k], params[k]) for k in params}
        state = jax.jit(tx.init)(params)
        out['jit_init_same'] = {k: _same_sharding(_mu(state)[k], params[k]) for k in params}
        out['jit_init_specs'] = {k: _spec(v) for k, v in _mu(state).items()}

        grads = [put(g) for g in grads_np]
        for init_name, init in (('eager', tx.init), ('jit', jax.jit(tx.init))):
            counted = jax.jit(tx.update)
            counted_state = init(params)
            for g in grads:
                _, counted_state = counted(g, counted_state, params)
            out[f'compilations_{init_name}_init'] = counted._cache_size()
        update = jax.jit(tx.update)
        compiled = update.lower(grads[0], state, params).compile()
        out['update_collectives'] = _describe(lion_optax.hlo.collectives(compiled))
        skipping = lion_optax.lion(1e-2, weight_decay=0.1, nonfinite='skip_step')
        compiled = (
            jax.jit(skipping.update)
            .lower(grads[0], jax.jit(skipping.init)(params), params)
            .compile()
        )
        out['update_collectives_skip_step'] = _describe(lion_optax.hlo.collectives(compiled))
        out['steps_state_same'] = []
        out['steps_params_same'] = []
        for g in grads:
            updates, state = update(g, state, params)
            new_params = optax.apply_updates(params, updates)
            out['steps_state_same'].append(
                all(_same_sharding(_mu(state)[k], params[k]) for k in params)
            )
            out['steps_params_same'].append(
                all(_same_sharding(new_params[k], params[k]) for k in params)
            )
            params = new_params
        expected = _lion_single_device()
        out['max_diff_vs_single_device'] = max(
            float(np.max(np.abs(np.asarray(params[k]) - expected[k]))) for k in params
        )
    return out


def variants() -> dict:
    """Collectives of kappa / cautious variants whose direction is not element-wise."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding

    import lion_optax
    import lion_optax.checkpoint

    layout, params_np, grads_np = _problem()
    mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    params = {k: jax.device_put(v, NamedSharding(mesh, layout[k][1])) for k, v in params_np.items()}
    grads = {
        k: jax.device_put(v, NamedSharding(mesh, layout[k][1])) for k, v in grads_np[0].items()
    }
    out: dict = {}
    for name, options in {
        'l2_global': dict(kappa='l2_global'),
        'l2_leaf': dict(kappa='l2'),
        'cautious': dict(cautious=True),
    }.items():
        tx = lion_optax.lion(1e-2, **options)
        state = jax.jit(tx.init)(params)
        compiled = jax.jit(tx.update).lower(grads, state, params).compile()
        out[name] = _describe(lion_optax.hlo.collectives(compiled))
        updates, _ = jax.jit(tx.update)(grads, state, params)
        single = jax.jit(tx.update)(grads_np[0], tx.init(params_np), params_np)[0]
        out[name + '_max_diff'] = max(
            float(np.max(np.abs(np.asarray(updates[k]) - np.asarray(single[k])))) for k in params
        )
    return out


def _momentum_bytes(state, leaf: str, per_device: bool) -> int:
    import lion_optax
    import lion_optax.checkpoint

    inner = state[0]
    arrays = [inner.mu[leaf]] + ([inner.mu_scales[leaf]] if hasattr(inner, 'mu_scales') else [])
    return lion_optax.hlo.tree_bytes(arrays, per_device=per_device)


def storages() -> dict:
    """Every momentum storage under every parameter layout: per-device bytes, traffic, results.

    The big leaf 'w' (64 x 256) is sharded by the layout; the bias stays
    replicated. Reported per storage and layout: the momentum's (codes and
    scales for int8) bytes on one device over its total, after an eager
    init, a jitted init and every update; the update's collectives; and the
    largest difference of the parameters from a one-device run.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax
    import lion_optax.checkpoint

    rng = np.random.default_rng(1)
    params_np = {'w': rng.normal(size=(64, 256)).astype(np.float32),
                 'b': rng.normal(size=(256,)).astype(np.float32)}
    grads_np = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params_np.items()}
                for _ in range(STEPS)]
    line = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    layouts = {
        'fsdp': (line, P('data', None)),
        'tensor_parallel': (line, P(None, 'data')),
        '2d': (grid, P('data', 'model')),
        'replicated': (line, P()),
    }
    out: dict = {}
    storages = {'float32': None, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16, 'int8': 'int8'}
    for storage, mu_dtype in storages.items():
        tx = lion_optax.lion(1e-2, weight_decay=0.1, mu_dtype=mu_dtype)
        expected = _single_device(tx, params_np, grads_np)
        for layout, (mesh, spec) in layouts.items():
            shardings = {'w': NamedSharding(mesh, spec), 'b': NamedSharding(mesh, P())}

            def put(tree, shardings=shardings):
                return {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

            params = put(params_np)
            fractions = []
            for state in (tx.init(params), jax.jit(tx.init)(params)):
                fractions.append(_momentum_bytes(state, 'w', True) / _momentum_bytes(state, 'w', False))
            update = jax.jit(tx.update)
            compiled = update.lower(put(grads_np[0]), state, params).compile()
            for g in grads_np:
                updates, state = update(put(g), state, params)
                params = optax.apply_updates(params, updates)
                fractions.append(_momentum_bytes(state, 'w', True) / _momentum_bytes(state, 'w', False))
            out[f'{storage}/{layout}'] = {
                'devices_holding_w': len(mesh.devices.flat) if spec != P() else 1,
                'fractions': fractions,
                'collectives': _describe(lion_optax.hlo.collectives(compiled)),
                'max_diff_vs_single_device': max(
                    float(np.max(np.abs(np.asarray(params[k], np.float64) - expected[k])))
                    for k in params
                ),
                'param_sharding_kept': params['w'].sharding.is_equivalent_to(shardings['w'], 2),
            }
    return out


def zero() -> dict:
    """ZeRO-style: replicated params, momentum sharded along 'data' (size 4)."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax
    import lion_optax.checkpoint

    layout, params_np, grads_np = _problem()
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())
    params = {k: jax.device_put(v, replicated) for k, v in params_np.items()}
    grads = [{k: jax.device_put(v, replicated) for k, v in g.items()} for g in grads_np]
    out: dict = {}
    plain = lion_optax.lion(1e-2, weight_decay=0.1)
    tx = lion_optax.shard_optimizer_state(plain, 'data', mesh=mesh)
    out['replicated_state_bytes'] = lion_optax.hlo.tree_bytes(plain.init(params))
    state = tx.init(params)
    out['eager_state_bytes'] = lion_optax.hlo.tree_bytes(state)
    state = jax.jit(tx.init)(params)
    out['jit_state_bytes'] = lion_optax.hlo.tree_bytes(state)
    out['mu_specs'] = {k: _spec(v) for k, v in _mu(state).items()}
    update = jax.jit(tx.update)
    compiled = update.lower(grads[0], state, params).compile()
    out['collectives'] = [
        [c.kind, c.buffer_bytes, c.bytes_sent] for c in lion_optax.hlo.collectives(compiled)
    ]
    out['params_bytes'] = int(sum(v.nbytes for v in params_np.values()))
    out['params_replicated'] = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        out['params_replicated'].append(
            all(v.sharding.is_fully_replicated for v in params.values())
        )
    out['state_bytes_after_updates'] = lion_optax.hlo.tree_bytes(state)
    out['compilations'] = update._cache_size()
    eager_update, eager_state = jax.jit(tx.update), tx.init(params)
    for g in grads:
        _, eager_state = eager_update(g, eager_state, params)
    out['compilations_eager_init'] = eager_update._cache_size()
    expected = _lion_single_device()
    out['max_diff_vs_single_device'] = max(
        float(np.max(np.abs(np.asarray(params[k]) - expected[k]))) for k in params
    )
    explicit = jax.make_mesh((4, 2), ('data', 'model'))
    try:
        lion_optax.shard_optimizer_state(plain, 'data', mesh=explicit).init(
            {k: jax.device_put(v, NamedSharding(explicit, P())) for k, v in params_np.items()}
        )
        out['explicit_error'] = ''
    except ValueError as error:
        out['explicit_error'] = str(error)
    return out


def zero_int8() -> dict:
    """ZeRO-style with int8 momentum: codes and scales both split along 'data'."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax
    import lion_optax.checkpoint

    rng = np.random.default_rng(2)
    params_np = {'w': rng.normal(size=(64, 256)).astype(np.float32)}
    grads_np = [{'w': rng.normal(size=(64, 256)).astype(np.float32)} for _ in range(STEPS)]
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())
    plain = lion_optax.lion(1e-2, weight_decay=0.1, mu_dtype='int8')
    tx = lion_optax.shard_optimizer_state(plain, 'data', mesh=mesh)
    params = {k: jax.device_put(v, replicated) for k, v in params_np.items()}
    state = jax.jit(tx.init)(params)
    out = {'fractions': [_momentum_bytes(state, 'w', True) / _momentum_bytes(state, 'w', False)]}
    update = jax.jit(tx.update)
    for g in grads_np:
        updates, state = update({k: jax.device_put(v, replicated) for k, v in g.items()},
                                state, params)
        params = optax.apply_updates(params, updates)
        out['fractions'].append(_momentum_bytes(state, 'w', True) / _momentum_bytes(state, 'w', False))
    expected = _single_device(plain, params_np, grads_np)
    out['max_diff_vs_single_device'] = float(
        np.max(np.abs(np.asarray(params['w'], np.float64) - expected['w']))
    )
    return out


def checkpoints_across_meshes(folder: str) -> dict:
    """bf16 and int8 state saved from an (8,) FSDP mesh, restored onto (2, 4) and one device.

    Per storage: whether every restored array has the target's sharding, the
    largest difference between the run continued after the restore and the
    uninterrupted run, and the error for a target with another storage.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax
    import lion_optax.checkpoint

    rng = np.random.default_rng(3)
    params_np = {'w': rng.normal(size=(64, 256)).astype(np.float32),
                 'b': rng.normal(size=(256,)).astype(np.float32)}
    grads_np = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params_np.items()}
                for _ in range(2 * STEPS)]
    line = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    layouts = {
        'mesh_8': {'w': NamedSharding(line, P('data', None)), 'b': NamedSharding(line, P())},
        'mesh_2x4': {'w': NamedSharding(grid, P('data', 'model')), 'b': NamedSharding(grid, P())},
        'one_device': {k: SingleDeviceSharding(jax.devices()[0]) for k in params_np},
    }

    def run(tx, params, state, grads, shardings):
        update = jax.jit(tx.update)
        for g in grads:
            g = {k: jax.device_put(v, shardings[k]) for k, v in g.items()}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    out: dict = {}
    for storage, mu_dtype in (('bfloat16', jnp.bfloat16), ('int8', 'int8')):
        tx = lion_optax.lion(1e-2, weight_decay=0.1, mu_dtype=mu_dtype)
        saving = layouts['mesh_8']
        params = {k: jax.device_put(v, saving[k]) for k, v in params_np.items()}
        params, state = run(tx, params, jax.jit(tx.init)(params), grads_np[:STEPS], saving)
        lion_optax.checkpoint.save_checkpoint(f'{folder}/{storage}', STEPS, {'params': params, 'opt': state})
        expected, _ = run(tx, params, state, grads_np[STEPS:], saving)
        for name, shardings in layouts.items():
            target_params = {k: jax.device_put(v, shardings[k]) for k, v in params_np.items()}
            target = {'params': target_params, 'opt': jax.jit(tx.init)(target_params)}
            restored, _ = lion_optax.checkpoint.restore_checkpoint(f'{folder}/{storage}', target)
            same = jax.tree.map(
                lambda r, t: r.sharding.is_equivalent_to(t.sharding, r.ndim), restored, target
            )
            continued, _ = run(tx, restored['params'], restored['opt'], grads_np[STEPS:], shardings)
            out[f'{storage}/{name}'] = {
                'shardings_as_target': all(jax.tree.leaves(same)),
                'max_diff': max(
                    float(np.max(np.abs(np.asarray(continued[k]) - np.asarray(expected[k]))))
                    for k in params_np
                ),
            }
        other = lion_optax.lion(1e-2, mu_dtype=jnp.float32 if storage == 'int8' else 'int8')
        try:
            lion_optax.checkpoint.restore_checkpoint(
                f'{folder}/{storage}', {'params': params, 'opt': other.init(params)}
            )
            out[f'{storage}/mismatch_error'] = ''
        except lion_optax.checkpoint.CheckpointMismatchError as error:
            out[f'{storage}/mismatch_error'] = str(error)
    return out


def memory_script_check() -> dict:
    """benchmarks/memory_at_scale.py's per-device bytes against what 8 devices hold."""
    import jax
    from jax.sharding import AxisType, NamedSharding

    import lion_optax
    import lion_optax.checkpoint
    from benchmarks import memory_at_scale
    from benchmarks._model_trees import abstract_gpt, gpt_tree

    devices = 8
    mesh = jax.make_mesh((devices,), ('data',), axis_types=(AxisType.Auto,))
    sizes = dict(blocks=2, width=64, vocab=512, context=128)
    abstract = abstract_gpt(**sizes)
    params = jax.tree.map(
        lambda p: jax.device_put(p, NamedSharding(mesh, memory_at_scale.fsdp_spec(p.shape, devices))),
        gpt_tree(**sizes),
    )
    out = {}
    for name, tx in memory_at_scale.optimizers().items():
        state, specs = memory_at_scale.state_specs(tx, abstract, devices)
        predicted = memory_at_scale.bytes_per_device(state, specs, devices)
        # optax's own init under jit leaves the state unsharded (zeros that depend
        # on nothing); eagerly it follows the parameters, which is what we compare.
        init = tx.init if name.startswith('optax') else jax.jit(tx.init)
        held = lion_optax.hlo.tree_bytes(init(params))
        out[name] = {'predicted': predicted, 'held': held}
    return out


def main() -> None:
    _setup()
    import jax

    assert jax.device_count() == 8, jax.devices()
    result = {kind: sharded_lion(kind) for kind in ('auto', 'explicit', 'explicit_set_mesh')}
    result['variants'] = variants()
    result['storages'] = storages()
    result['zero'] = zero()
    result['zero_int8'] = zero_int8()
    result['checkpoints'] = checkpoints_across_meshes(sys.argv[2])
    result['memory_script'] = memory_script_check()
    with open(sys.argv[1], 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
