"""Lion on a 2-D device mesh; run as a subprocess by test_sharding.py.

``python _multidevice_sharding.py OUT.json``: one process, 8 CPU devices on a
(data=2, model=4) mesh. Runs ``lion_optax.lion`` on sharded parameters with
Auto and Explicit meshes (with and without ``jax.set_mesh``), eagerly and
jitted ``init``; the global-norm and cautious variants; and the ZeRO-style
``shard_optimizer_state``. Writes every number the tests assert on to OUT.json;
the assertions live in test_sharding.py.
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
    return {k: np.asarray(v) for k, v in params.items()}


def _mu(state):
    if hasattr(state, 'inner_state'):  # lion = skip_nonfinite(chain(scale_by_lion, ...))
        state = state.inner_state
    return state[0].mu


def sharded_lion(mesh_kind: str) -> dict:
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding

    import lion_optax

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

        update = jax.jit(tx.update)
        grads = [put(g) for g in grads_np]
        compiled = update.lower(grads[0], state, params).compile()
        out['update_collectives'] = _describe(lion_optax.hlo_collectives(compiled))
        bare = lion_optax.lion(1e-2, weight_decay=0.1, skip_nonfinite=False)
        compiled = (
            jax.jit(bare.update).lower(grads[0], jax.jit(bare.init)(params), params).compile()
        )
        out['update_collectives_no_skip'] = _describe(lion_optax.hlo_collectives(compiled))
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
        tx = lion_optax.lion(1e-2, **options, skip_nonfinite=False)
        state = jax.jit(tx.init)(params)
        compiled = jax.jit(tx.update).lower(grads, state, params).compile()
        out[name] = _describe(lion_optax.hlo_collectives(compiled))
        updates, _ = jax.jit(tx.update)(grads, state, params)
        single = jax.jit(tx.update)(grads_np[0], tx.init(params_np), params_np)[0]
        out[name + '_max_diff'] = max(
            float(np.max(np.abs(np.asarray(updates[k]) - np.asarray(single[k])))) for k in params
        )
    return out


def zero() -> dict:
    """ZeRO-style: replicated params, momentum sharded along 'data' (size 4)."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lion_optax

    layout, params_np, grads_np = _problem()
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    replicated = NamedSharding(mesh, P())
    params = {k: jax.device_put(v, replicated) for k, v in params_np.items()}
    grads = [{k: jax.device_put(v, replicated) for k, v in g.items()} for g in grads_np]
    out: dict = {}
    plain = lion_optax.lion(1e-2, weight_decay=0.1)
    tx = lion_optax.shard_optimizer_state(plain, 'data', mesh=mesh)
    out['replicated_state_bytes'] = lion_optax.tree_bytes(plain.init(params))
    state = tx.init(params)
    out['eager_state_bytes'] = lion_optax.tree_bytes(state)
    state = jax.jit(tx.init)(params)
    out['jit_state_bytes'] = lion_optax.tree_bytes(state)
    out['mu_specs'] = {k: _spec(v) for k, v in _mu(state).items()}
    update = jax.jit(tx.update)
    compiled = update.lower(grads[0], state, params).compile()
    out['collectives'] = [
        [c.kind, c.buffer_bytes, c.bytes_sent] for c in lion_optax.hlo_collectives(compiled)
    ]
    out['params_bytes'] = int(sum(v.nbytes for v in params_np.values()))
    out['params_replicated'] = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        out['params_replicated'].append(
            all(v.sharding.is_fully_replicated for v in params.values())
        )
    out['state_bytes_after_updates'] = lion_optax.tree_bytes(state)
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


def main() -> None:
    _setup()
    import jax

    assert jax.device_count() == 8, jax.devices()
    result = {kind: sharded_lion(kind) for kind in ('auto', 'explicit', 'explicit_set_mesh')}
    result['variants'] = variants()
    result['zero'] = zero()
    with open(sys.argv[1], 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
