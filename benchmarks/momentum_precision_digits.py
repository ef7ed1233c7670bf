"""Does low-precision momentum cost accuracy? fp32 vs bf16 vs int8 momentum on a real task.

The main job's MLP (64-256-256-10, LayerNorm, GELU; ``main_job._models.MLP``) on the main
job's split of scikit-learn's 8x8 digits (``main_job._data.load_digits_splits``: trained on
the 60% train split, reported on the 20% test split; no download), trained with
``lion_optax.lion`` for a fixed number of minibatch steps, once per momentum
storage and seed:

- ``fp32``: float32 momentum (4 bytes per parameter);
- ``bf16``: bfloat16 momentum with stochastic rounding (2 bytes);
- ``bf16 nearest``: bfloat16 rounded to nearest (optax's behaviour), for contrast;
- ``int8``: block-wise int8 (blocks of 256, one float32 scale each, stochastic
  rounding; arrays under 4096 elements stay float32);
- ``int8 all``: int8 for every array (``min_quantized_size=0``), the strictest.

Every seed shares its initialisation and minibatch order across the storages,
so differences are paired. We report the test accuracy and the final training
loss, mean and standard deviation over seeds, and the paired difference to
fp32 with its standard error. "Within the noise" means the mean paired
difference is within 2 standard errors of zero, or smaller than the
seed-to-seed spread of fp32 itself.

Usage::

    python -m benchmarks.momentum_precision_digits              # 8 seeds
    python -m benchmarks.momentum_precision_digits --seeds 3 --steps 600 --out results/momentum_precision/
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lion_optax

from . import _output
from .main_job import _data, _models

STORAGES = {
    'fp32': dict(),
    'bf16': dict(mu_dtype=jnp.bfloat16),
    'bf16 nearest': dict(mu_dtype=jnp.bfloat16, rounding=lion_optax.Rounding(momentum='nearest')),
    'int8': dict(mu_dtype='int8'),
    'int8 all': dict(mu_dtype=lion_optax.Int8Momentum(block_size=256, min_quantized_size=0)),
}

MODEL = functools.partial(_models.MLP, 256, 10)
GRAPHDEF = _models.graph_definition(MODEL)


def train(storage: dict[str, Any], seed: int, steps: int, batch: int, splits) -> dict[str, float]:
    tx = lion_optax.lion(
        optax.schedules.warmup_cosine_decay_schedule(0.0, 1e-3, steps // 10, steps, 1e-5),
        weight_decay=0.1,
        seed=seed,
        **storage,
    )
    x_train, y_train = (jnp.asarray(a) for a in splits['train'])
    x_test, y_test = (jnp.asarray(a) for a in splits['test'])
    params = _models.init_params(MODEL, jax.random.key(seed))
    state = tx.init(params)
    n = x_train.shape[0]
    batches = np.random.default_rng(seed).integers(0, n, size=(steps, batch))

    @jax.jit
    def run(params, state, batches):
        def body(carry, index):
            params, state = carry
            loss, grads = jax.value_and_grad(functools.partial(_models.loss, GRAPHDEF))(
                params, x_train[index], y_train[index]
            )
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(body, (params, state), batches)
        return params, losses

    params, losses = run(params, state, jnp.asarray(batches))
    test_loss, accuracy = _models.loss_and_accuracy(GRAPHDEF, params, x_test, y_test)
    return {
        'test_accuracy': float(accuracy),
        'test_loss': float(test_loss),
        'final_train_loss': float(jnp.mean(losses[-50:])),
    }


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per storage: seed statistics and the paired differences to fp32 (see the docstring)."""
    summary = {}
    base = np.array([r['test_accuracy'] for r in runs['fp32']])
    base_loss = np.array([r['test_loss'] for r in runs['fp32']])
    for name, results in runs.items():
        acc = np.array([r['test_accuracy'] for r in results])
        test_loss = np.array([r['test_loss'] for r in results])
        diff = acc - base
        loss_diff = test_loss - base_loss
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float('nan')
        loss_se = loss_diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float('nan')
        summary[name] = {
            'test_accuracy_mean': float(acc.mean()),
            'test_accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            'test_loss_mean': float(test_loss.mean()),
            'test_loss_std': float(test_loss.std(ddof=1)) if len(acc) > 1 else 0.0,
            'final_train_loss_mean': float(np.mean([r['final_train_loss'] for r in results])),
            'paired_accuracy_diff_vs_fp32': float(diff.mean()),
            'paired_accuracy_diff_se': float(se),
            'paired_test_loss_diff_vs_fp32': float(loss_diff.mean()),
            'paired_test_loss_diff_se': float(loss_se),
            'within_noise': bool(
                name == 'fp32'
                or abs(diff.mean()) <= max(2 * se, base.std(ddof=1) if len(base) > 1 else 0.0)
            ),
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    header = ['momentum', 'test acc. mean +- std', 'paired diff vs fp32 (+- se)']
    header += ['test loss mean +- std', 'paired loss diff (+- se)', 'within noise']
    rows = [
        [
            name,
            f'{s["test_accuracy_mean"]:.4f} +- {s["test_accuracy_std"]:.4f}',
            f'{s["paired_accuracy_diff_vs_fp32"]:+.4f} +- {s["paired_accuracy_diff_se"]:.4f}',
            f'{s["test_loss_mean"]:.4f} +- {s["test_loss_std"]:.4f}',
            f'{s["paired_test_loss_diff_vs_fp32"]:+.4f} +- {s["paired_test_loss_diff_se"]:.4f}',
            'yes' if s['within_noise'] else 'NO',
        ]
        for name, s in report['summary'].items()
    ]
    return _output.document(
        f'# Momentum storage on digits (MLP, {report["seeds"]} seeds, {report["steps"]} steps, '
        f'batch {report["batch"]})',
        _output.markdown_table(header, rows),
    )


def main(argv: list[str] | None = None) -> Path:
    parser = _output.parser(
        'momentum_precision_digits', __doc__, out='results/momentum_precision/'
    )
    parser.add_argument('--seeds', type=int, default=8)
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--batch', type=int, default=32)
    args = parser.parse_args(argv)
    splits = _data.load_digits_splits()
    clock = _output.Clock()
    runs = {
        name: [train(kw, seed, args.steps, args.batch, splits) for seed in range(args.seeds)]
        for name, kw in STORAGES.items()
    }
    report = {
        'seeds': args.seeds,
        'steps': args.steps,
        'batch': args.batch,
        'device': str(jax.devices()[0].device_kind),
        'summary': summarize(runs),
        'runs': runs,
        'wall_seconds': clock.seconds,
    }
    _output.write_report(args.out, 'momentum_precision', report, markdown)
    return args.out


if __name__ == '__main__':
    main()
