"""Global Lion, Distributed Lion (vote, average) and AdamW on 8 simulated devices.

Trains one MLP on scikit-learn's digits with data parallelism over 8 CPU
devices (``jax_num_cpu_devices=8``), four ways:

* ``adamw`` and ``lion (global)``: every worker's gradient is averaged with a
  float32 all-reduce, then the optimizer runs replicated;
* ``distributed lion (vote)`` and ``(average)``: each worker keeps its own
  momentum and only packed signs travel (``lion_optax.distributed_lion``).

The bytes one device sends per step are read from each compiled train step
(``lion_optax.hlo.bytes_sent_per_device``), so the second plot (held-out loss
against bytes communicated) uses measured traffic, not a formula. A second
table extrapolates the traffic to 1e9 parameters and up to 1024 workers with
``lion_optax.hlo.sign_layout``.

Run::

    python -m benchmarks.distributed_lion            # 3 seeds x 300 steps
    python -m benchmarks.distributed_lion --quick    # 1 seed x 60 steps, < 1 minute

Writes ``results.json`` and ``distributed_lion.png`` into ``--out``
(default ``results/distributed/``). Seeds are interleaved across methods;
the table quotes medians with [min, max] over seeds. All runs use a cosine
decay; AdamW has lr 3e-3 and decay 1e-2, Lion ``lion_optax.adamw_to_lion``
of those with ``--lion-factor`` (3 for 300 steps, 1 for the 60 steps of
``--quick``; both picked on the validation split, the table reports test).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lion_optax  # noqa: E402

from . import _output  # noqa: E402
from .main_job import _data, _models  # noqa: E402

WORKERS = 8
METHODS = ('adamw', 'lion (global)', 'distributed lion (vote)', 'distributed lion (average)')


MODEL = functools.partial(_models.MLP, 128, 10)  # 64-128-128-10, LayerNorm, GELU
GRAPHDEF = _models.graph_definition(MODEL)


ADAMW_LR, ADAMW_WD = 3e-3, 1e-2


def _optimizer(method: str, steps: int, lion_factor: float = 3.0) -> optax.GradientTransformation:
    def cosine(peak):
        return optax.cosine_decay_schedule(peak, steps, alpha=0.1)

    mask = _models.decay_mask  # no decay on biases and norm scales
    if method == 'adamw':
        return optax.adamw(cosine(ADAMW_LR), weight_decay=ADAMW_WD, mask=mask)
    lion_lr, lion_wd = lion_optax.adamw_to_lion(ADAMW_LR, ADAMW_WD, factor=lion_factor)
    if method == 'lion (global)':
        return lion_optax.lion(cosine(lion_lr), weight_decay=lion_wd, mask=mask)
    kind = 'vote' if 'vote' in method else 'average'
    return lion_optax.distributed_lion(
        cosine(lion_lr), weight_decay=lion_wd, mask=mask, axis_name='data', method=kind
    )


def _train_step(method: str, tx, mesh, state_specs):
    """A jitted step over the data axis; returns (params, state, per-worker loss)."""
    distributed = method.startswith('distributed')

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), state_specs, P('data'), P('data')),
        out_specs=(P(), state_specs, P('data')),
    )
    def step(params, state, x, y):
        local = jax.lax.pcast(params, 'data', to='varying')
        loss, grads = jax.value_and_grad(functools.partial(_models.loss, GRAPHDEF))(local, x, y)
        if not distributed:
            grads = jax.lax.pmean(grads, 'data')  # the float32 all-reduce
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss[None]

    return step


def run(
    method: str,
    seed: int,
    steps: int,
    eval_every: int,
    per_worker: int,
    data,
    lion_factor: float = 3.0,
) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    mesh = jax.make_mesh((WORKERS,), ('data',))
    params = jax.device_put(_models.init_params(MODEL, seed), NamedSharding(mesh, P()))
    tx = _optimizer(method, steps, lion_factor)
    if method.startswith('distributed'):
        state, specs = lion_optax.distributed_init(tx, params, mesh)
    else:
        state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
        specs = jax.tree.map(lambda _: P(), state)
    step = _train_step(method, tx, mesh, specs)
    batch = WORKERS * per_worker
    rng = np.random.default_rng(1000 + seed)
    order = np.concatenate(
        [rng.permutation(len(y_train)) for _ in range(steps * batch // len(y_train) + 1)]
    )
    sharded = NamedSharding(mesh, P('data'))

    def batch_at(t):
        idx = order[t * batch : (t + 1) * batch]
        return jax.device_put(x_train[idx], sharded), jax.device_put(y_train[idx], sharded)

    compiled = step.lower(params, state, *batch_at(0)).compile()
    bytes_per_step = lion_optax.hlo.bytes_sent_per_device(compiled)
    evaluate = jax.jit(functools.partial(_models.loss_and_accuracy, GRAPHDEF))
    test_steps, test_loss, train_loss = [], [], []
    start = time.perf_counter()
    for t in range(steps):
        params, state, loss = step(params, state, *batch_at(t))
        train_loss.append(float(jnp.mean(loss)))
        if (t + 1) % eval_every == 0 or t == steps - 1:
            test_steps.append(t + 1)
            test_loss.append(float(evaluate(params, x_test, y_test)[0]))
    seconds = time.perf_counter() - start
    accuracy = float(evaluate(params, x_test, y_test)[1])
    return {
        'method': method,
        'seed': seed,
        'bytes_per_step': bytes_per_step,
        'collectives': [
            [c.kind, c.buffer_bytes, c.bytes_sent] for c in lion_optax.hlo.collectives(compiled)
        ],
        'train_loss': train_loss,
        'test_steps': test_steps,
        'test_loss': test_loss,
        'test_accuracy': accuracy,
        'seconds_per_step': seconds / steps,
    }


def scaling_table(num_params: int = 10**9, workers=(8, 64, 256, 1024)) -> list[dict]:
    rows = []
    for n in workers:
        vote = lion_optax.hlo.sign_layout(num_params, n, 'vote')
        average = lion_optax.hlo.sign_layout(num_params, n, 'average')
        rows.append(
            {
                'workers': n,
                'fp32_allreduce_gb': vote.fp32_allreduce_bytes / 1e9,
                'allgather_1bit_gb': (n - 1) / n * n * num_params / 8 / 1e9,
                'vote_gb': vote.bytes_sent_per_device / 1e9,
                'average_gb': average.bytes_sent_per_device / 1e9,
            }
        )
    return rows


def _spread(values) -> str:
    values = np.asarray(values, dtype=float)
    return f'{np.median(values):.4g} [{values.min():.4g}, {values.max():.4g}]'


def _plot(runs: list[dict]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=120, layout='tight')
    by_step, by_bytes = fig.subplots(1, 2)
    colors = dict(zip(METHODS, ('tab:gray', 'tab:blue', 'tab:orange', 'tab:green')))
    for method in METHODS:
        mine = [r for r in runs if r['method'] == method]
        steps = np.asarray(mine[0]['test_steps'])
        losses = np.asarray([r['test_loss'] for r in mine])
        median = np.median(losses, axis=0)
        megabytes = steps * mine[0]['bytes_per_step'] / 1e6
        for axis, x in ((by_step, steps), (by_bytes, megabytes)):
            axis.plot(x, median, label=method, color=colors[method])
            if len(mine) > 1:
                axis.fill_between(x, losses.min(0), losses.max(0), color=colors[method], alpha=0.2)
    by_step.set_xlabel('step')
    by_bytes.set_xlabel('MB sent per device (from the compiled HLO), log scale')
    by_bytes.set_xscale('log')
    for axis in (by_step, by_bytes):
        axis.set_ylabel('held-out cross-entropy')
        axis.set_yscale('log')
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f'MLP on digits, data parallel over {WORKERS} simulated devices')
    return fig


def main(argv=None) -> dict:
    parser = _output.parser('distributed_lion', __doc__, out='results/distributed')
    parser.add_argument('--quick', action='store_true', help='1 seed x 60 steps (< 1 minute)')
    parser.add_argument('--steps', type=int, default=None)
    parser.add_argument('--seeds', type=int, default=None)
    parser.add_argument(
        '--lion-factor',
        type=float,
        default=None,
        help="Lion's lr is AdamW's / factor, its decay AdamW's * factor (default: 3, or 1 "
        'with --quick; both chosen on the validation split)',
    )
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    lion_factor = args.lion_factor or (1.0 if args.quick else 3.0)
    seeds = args.seeds or (1 if args.quick else 3)
    eval_every = max(steps // 30, 1)
    splits = _data.load_digits_splits()
    data = (splits['train'], splits['test'])

    runs = []
    for seed in range(seeds):  # interleaved: every method once per seed
        for method in METHODS:
            runs.append(run(method, seed, steps, eval_every, 16, data, lion_factor=lion_factor))

    fp32 = next(r for r in runs if r['method'] == 'lion (global)')['bytes_per_step']
    print(
        f'\n{WORKERS} workers x 16 examples, {steps} steps, {seeds} seed(s), Lion lr = AdamW lr / '
        f'{lion_factor:g}; medians [min, max] over seeds'
    )
    header = f'{"method":28s} {"bytes/step/device":>18s} {"vs fp32":>8s} {"final test loss":>28s} {"test accuracy":>28s} {"ms/step":>22s}'
    print(header)
    print('-' * len(header))
    summary = []
    for method in METHODS:
        mine = [r for r in runs if r['method'] == method]
        row = {
            'method': method,
            'bytes_per_step': mine[0]['bytes_per_step'],
            'fraction_of_fp32_allreduce': mine[0]['bytes_per_step'] / fp32,
            'final_test_loss': [r['test_loss'][-1] for r in mine],
            'test_accuracy': [r['test_accuracy'] for r in mine],
            'ms_per_step': [1e3 * r['seconds_per_step'] for r in mine],
        }
        summary.append(row)
        print(
            f'{method:28s} {row["bytes_per_step"]:18,.0f} {fp32 / row["bytes_per_step"]:7.1f}x '
            f'{_spread(row["final_test_loss"]):>28s} {_spread(row["test_accuracy"]):>28s} '
            f'{_spread(row["ms_per_step"]):>22s}'
        )
    print('("vs fp32": how many times fewer bytes than the float32 gradient all-reduce.)')

    scaling = scaling_table()
    print('\nTraffic per device per step for 1e9 parameters (GB), from sign_layout:')
    print(
        f'{"workers":>8s} {"fp32 all-reduce":>16s} {"1-bit all-gather":>17s} {"vote":>8s} {"average":>8s}'
    )
    for row in scaling:
        print(
            f'{row["workers"]:8d} {row["fp32_allreduce_gb"]:16.2f} {row["allgather_1bit_gb"]:17.2f} '
            f'{row["vote_gb"]:8.3f} {row["average_gb"]:8.3f}'
        )

    result = {
        'workers': WORKERS,
        'steps': steps,
        'seeds': seeds,
        'adamw': {'learning_rate': ADAMW_LR, 'weight_decay': ADAMW_WD},
        'lion_factor': lion_factor,
        'num_params': int(sum(v.size for v in jax.tree.leaves(_models.init_params(MODEL, 0)))),
        'summary': summary,
        'scaling_1e9_params': scaling,
        'runs': runs,
        'jax_version': jax.__version__,
    }
    files = {'results.json': result, 'distributed_lion.png': lambda: _plot(runs)}
    _output.write(args.out, files, indent=1)
    return result


if __name__ == '__main__':
    main()
