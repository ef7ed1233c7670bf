"""Tasks, optimizers and the jitted training loop behind ``benchmarks/main_job.py``.

The data are in ``_data`` and the models in ``_models``. The training loop is
functional: the model is split once into a graph definition and a pure parameter tree;
each step is one jitted gradient (shared by all optimizers of a task) and one jitted
optimizer update (see ``Trainer``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import _data
import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lion_optax

# Kept importable from here for the code that imported it before the split
# (tests/test_flax.py); the mask lives with the models.
decay_mask = _models.decay_mask


# ---------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (cache key)
class Task:
    """One benchmark problem: data, model, training budget and success target.

    ``target`` is ``(metric, threshold)``: a run reaches the target at the first
    evaluation where validation ``metric`` is at least (accuracy) or at most (loss)
    ``threshold``.
    """

    name: str
    description: str
    make_model: Callable[[nnx.Rngs], nnx.Module]
    data: dict[str, _data.Split]
    batch_size: int
    steps: int
    eval_every: int
    target: tuple[str, float]
    lion_betas: tuple[float, float]
    adamw_betas: tuple[float, float]
    is_lm: bool = False


def digits_tasks(steps: int, eval_every: int, batch_size: int = 64) -> list[Task]:
    """The MLP and CNN tasks on scikit-learn's digits."""
    data = _data.load_digits_splits()
    common = dict(
        data=data,
        batch_size=batch_size,
        steps=steps,
        eval_every=eval_every,
        target=('accuracy', 0.96),
        lion_betas=(0.9, 0.99),
        adamw_betas=(0.9, 0.999),
    )
    return [
        Task(
            'digits-mlp',
            'MLP 64-256-256-10 (LayerNorm, GELU) on sklearn digits',
            lambda rngs: _models.MLP(256, 10, rngs=rngs),
            **common,
        ),
        Task(
            'digits-cnn',
            'CNN conv16-conv32-LayerNorm-pool-linear on sklearn digits',
            lambda rngs: _models.CNN(16, 10, rngs=rngs),
            **common,
        ),
    ]


def char_lm_task(
    steps: int,
    eval_every: int,
    *,
    dim: int = 64,
    layers: int = 2,
    context: int = 64,
    batch_size: int = 32,
    target_loss: float = 1.8,
    max_chars: int | None = None,
    eval_windows: int | None = 256,
) -> Task:
    """The character-level Transformer on ``pydoc_data``'s documentation text.

    Args:
      steps: training steps.
      eval_every: steps between validation evaluations.
      dim: model width.
      layers: number of Transformer blocks.
      context: characters per training sequence.
      batch_size: sequences per step.
      target_loss: validation loss (nats per character) that counts as reached.
      max_chars: truncate each split (tiny smoke runs only).
      eval_windows: evaluate on at most this many held-out windows (``None``: all).

    Returns:
      The ``Task``.
    """
    corpus = _data.char_corpus(_data.load_pydoc_text(), max_chars=max_chars)
    held_out = {k: _data.lm_windows(getattr(corpus, k), context) for k in ('val', 'test')}
    if eval_windows is not None:
        held_out = {k: (x[:eval_windows], y[:eval_windows]) for k, (x, y) in held_out.items()}
    # The training split stays one stream; batches are random windows of it.
    data = {'train': (corpus.train, np.zeros((0,), np.int32)), **held_out}
    vocab = len(corpus.vocab)
    return Task(
        'char-lm',
        f'char Transformer ({layers} layers, width {dim}, context {context}, '
        f'vocab {vocab}) on pydoc_data text ({len(corpus.train):,} train chars)',
        lambda rngs: _models.CharTransformer(vocab, context, dim, 4, layers, rngs=rngs),
        data,
        batch_size,
        steps,
        eval_every,
        ('loss', target_loss),
        lion_betas=(0.95, 0.98),
        adamw_betas=(0.9, 0.98),
        is_lm=True,
    )


# ---------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------

ADAMW = 'optax.adamw'
OPTAX_LION = 'optax.lion'
LION = 'lion_optax.lion'
CAUTIOUS_LION = 'lion_optax.lion(cautious)'
INT8_LION = 'lion_optax.lion(int8 momentum)'
# Block-wise int8 momentum (1 byte per parameter plus a float32 scale per block),
# when this version of lion_optax has it.
HAS_INT8 = hasattr(lion_optax, 'Int8Momentum')
OPTIMIZERS = [ADAMW, OPTAX_LION, LION, CAUTIOUS_LION] + ([INT8_LION] if HAS_INT8 else [])


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """An optimizer name plus its peak learning rate and weight decay."""

    name: str
    learning_rate: float
    weight_decay: float


def build_optimizer(
    name: str, task: Task, steps: int, learning_rate: Any, weight_decay: Any
) -> optax.GradientTransformation:
    """Builds optimizer ``name`` for ``task`` with the shared schedule and decay mask.

    Every optimizer gets the same schedule shape (linear warmup over 5% of the steps,
    cosine decay to 10% of the peak, as the Lion paper recommends) and the same mask
    (no decay on biases and norm scales). ``learning_rate`` (the peak) and
    ``weight_decay`` may be traced scalars, so one compilation serves a whole grid.
    """
    shape = lion_optax.warmup_cosine_schedule(1.0, steps)  # optax's needs a concrete peak

    def lr(count):
        return learning_rate * shape(count)

    wd = weight_decay
    if name == ADAMW:
        b1, b2 = task.adamw_betas
        return optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd, mask=_models.decay_mask)
    b1, b2 = task.lion_betas
    if name == OPTAX_LION:
        return optax.lion(lr, b1=b1, b2=b2, weight_decay=wd, mask=_models.decay_mask)
    if name in (LION, CAUTIOUS_LION, INT8_LION):
        return lion_optax.lion(
            lr,
            b1=b1,
            b2=b2,
            mu_dtype='int8' if name == INT8_LION else None,
            weight_decay=wd,
            mask=_models.decay_mask,
            cautious=name == CAUTIOUS_LION,
        )
    raise ValueError(f'Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.')


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What one training run measured."""

    eval_every: int
    steps: list[int]  # evaluation points
    val_loss: list[float]
    val_accuracy: list[float]
    chunk_seconds: list[float]  # wall time of each block of eval_every training steps
    test_loss: float
    test_accuracy: float
    compile_seconds: float
    opt_state_bytes: int
    param_bytes: int
    diverged: bool

    def time_per_step(self) -> float:
        """Median seconds per training step over the timed blocks."""
        return float(np.median(self.chunk_seconds) / self.eval_every)

    def reached(self, target: tuple[str, float]) -> tuple[int | None, float | None]:
        """(steps, training seconds) at the first evaluation that meets ``target``."""
        metric, threshold = target
        values = self.val_accuracy if metric == 'accuracy' else self.val_loss
        for i, v in enumerate(values):
            if (v >= threshold) if metric == 'accuracy' else (v <= threshold):
                return self.steps[i], float(sum(self.chunk_seconds[: i + 1]))
        return None, None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy (in float32) and accuracy of integer ``labels``."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, accuracy


@functools.cache
def _graphdef(task: Task) -> Any:
    return _models.graph_definition(task.make_model)


def _loss(task: Task, params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return cross_entropy(_models.apply(_graphdef(task), params, x), y)


@functools.cache
def _initializer(task: Task) -> Callable[[jax.Array], Any]:
    # One compilation for the whole model instead of one per parameter shape.
    return jax.jit(functools.partial(_models.init_params, task.make_model))


def init_params(task: Task, seed: int) -> Any:
    """Pure parameter tree of ``task``'s model freshly initialised from ``seed``."""
    return _initializer(task)(jax.random.key(seed))


@functools.cache
def _evaluator(task: Task) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted (loss, accuracy) on a held-out split, shared by all runs of ``task``."""

    def evaluate(params, x, y):
        # Loss and accuracy per example, 64 examples at a time; every example has the
        # same number of targets, so the mean of per-example means is the overall mean.
        def per_example(xy):
            return _loss(task, params, xy[0][None], xy[1][None])

        losses, accuracies = jax.lax.map(per_example, (x, y), batch_size=64)
        return losses.mean(), accuracies.mean()

    return jax.jit(evaluate)


@functools.cache
def _gradient(task: Task, batch_size: int) -> Callable[..., tuple[jax.Array, Any]]:
    """Jitted (loss, gradient) on the batch of step ``step``, shared by all optimizers.

    The batch depends only on (seed key, step), so every optimizer sees the same data.
    """
    context = task.data['val'][0].shape[1] if task.is_lm else None

    def sample(key, data):
        x, y = data
        if task.is_lm:
            starts = jax.random.randint(key, (batch_size,), 0, x.shape[0] - context - 1)
            window = jax.vmap(lambda s: jax.lax.dynamic_slice(x, (s,), (context + 1,)))(starts)
            return window[:, :-1], window[:, 1:]
        idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
        return x[idx], y[idx]

    def gradient(params, data, key, step):
        x, y = sample(jax.random.fold_in(key, step), data)
        (loss, _), grads = jax.value_and_grad(functools.partial(_loss, task), has_aux=True)(
            params, x, y
        )
        return loss, grads

    return jax.jit(gradient)


class Trainer:
    """Training loop for one task, optimizer, step budget and batch size.

    Each step is two jitted calls: the model's gradient (compiled once per task and
    batch size, shared by every optimizer) and the optimizer update (compiled once per
    optimizer; the learning rate and weight decay are runtime arguments, so a whole
    tuning grid shares it). Compiling the model once per task rather than once per
    optimizer is what keeps the job's start-up short on a 2-core machine.
    """

    def __init__(
        self,
        task: Task,
        name: str,
        *,
        steps: int | None = None,
        batch_size: int | None = None,
        eval_every: int | None = None,
    ):
        self.task = task
        self.name = name
        self.steps = steps or task.steps
        self.batch_size = batch_size or task.batch_size
        self.eval_every = min(eval_every or task.eval_every, self.steps)
        if self.steps % self.eval_every:
            raise ValueError(
                f'steps ({self.steps}) must be a multiple of eval_every ({self.eval_every}).'
            )
        self._update = jax.jit(self._apply_update)

    def _tx(self, hyperparameters: Any) -> optax.GradientTransformation:
        return build_optimizer(
            self.name, self.task, self.steps, hyperparameters[0], hyperparameters[1]
        )

    def _apply_update(self, grads, opt_state, params, hyperparameters):
        updates, opt_state = self._tx(hyperparameters).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(
        self, config: OptConfig, seed: int, on_chunk: Callable[[int], None] | None = None
    ) -> RunResult:
        """Trains from ``seed``; calls ``on_chunk(steps)`` after each block of steps."""
        if config.name != self.name:
            raise ValueError(f'This trainer runs {self.name}, got a config for {config.name}.')
        hyperparameters = jnp.array([config.learning_rate, config.weight_decay], jnp.float32)
        gradient, evaluate = _gradient(self.task, self.batch_size), _evaluator(self.task)
        params = init_params(self.task, seed)
        opt_state = self._tx((config.learning_rate, config.weight_decay)).init(params)
        # Committed to the device like every jit output, so the first step and the
        # later ones hit the same compiled executable.
        params, opt_state, data, key, hyperparameters = jax.device_put(
            (params, opt_state, self.task.data['train'], jax.random.key(seed), hyperparameters),
            jax.devices()[0],
        )
        t0 = time.perf_counter()
        # Compile (or fetch from cache) before timing, so timed blocks hold steps only.
        jax.block_until_ready(
            self._update(*gradient(params, data, key, 0)[1:], opt_state, params, hyperparameters)
        )
        compile_seconds = time.perf_counter() - t0
        steps, val_loss, val_acc, chunk_seconds = [], [], [], []
        diverged = False
        for start in range(0, self.steps, self.eval_every):
            t = time.perf_counter()
            for step in range(start, start + self.eval_every):
                loss, grads = gradient(params, data, key, step)
                params, opt_state = self._update(grads, opt_state, params, hyperparameters)
            train_loss = float(loss)  # blocks until the block of steps is done
            chunk_seconds.append(time.perf_counter() - t)
            loss, acc = evaluate(params, *self.task.data['val'])
            steps.append(start + self.eval_every)
            val_loss.append(float(loss))
            val_acc.append(float(acc))
            if on_chunk is not None:
                on_chunk(self.eval_every)
            if not (np.isfinite(train_loss) and np.isfinite(val_loss[-1])):
                diverged = True
                if on_chunk is not None:
                    on_chunk(self.steps - start - self.eval_every)
                break
        test_loss, test_acc = evaluate(params, *self.task.data['test'])
        return RunResult(
            self.eval_every,
            steps,
            val_loss,
            val_acc,
            chunk_seconds,
            float(test_loss),
            float(test_acc),
            compile_seconds,
            lion_optax.tree_bytes(opt_state, per_device=False),
            lion_optax.tree_bytes(params, per_device=False),
            diverged,
        )
