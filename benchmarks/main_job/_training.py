"""The jitted training loop of the main job: one task, one optimizer, timed blocks of steps.

The model is a pure parameter tree (see ``_models``). Each step is two jitted calls:
the model's gradient on the step's batch (compiled once per task and batch size,
shared by every optimizer) and the optimizer update (compiled once per optimizer,
``(b1, b2)`` pair and step budget; the learning rate and weight decay are runtime
arguments, so a whole tuning grid shares it). Compiling the model once per task
rather than once per optimizer keeps the job's start-up short on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lion_optax

from . import _models, _optimizers, _tasks


@dataclasses.dataclass
class RunResult:
    """What one training run measured.

    ``steps``, ``val_loss`` and ``val_accuracy`` are the evaluation points (every
    block with ``curve=True``, else only the last); ``test_loss`` and ``test_accuracy``
    are None when the run was not asked to touch the test split (tuning runs).
    """

    block_steps: int
    steps: list[int]
    val_loss: list[float]
    val_accuracy: list[float]
    block_seconds: list[float]  # wall time of each block of block_steps training steps
    test_loss: float | None
    test_accuracy: float | None
    opt_state_bytes: int
    param_bytes: int
    diverged: bool

    @property
    def final_val_loss(self) -> float:
        return float('inf') if self.diverged else self.val_loss[-1]

    def seconds_per_step(self) -> list[float]:
        """Seconds per step of every timed block (each the mean over its steps)."""
        return [s / self.block_steps for s in self.block_seconds]

    def reached(self, target: tuple[str, float]) -> tuple[int | None, float | None]:
        """(steps, training seconds) at the first evaluation that meets ``target``."""
        metric, threshold = target
        values = self.val_accuracy if metric == 'accuracy' else self.val_loss
        for i, v in enumerate(values):
            if (v >= threshold) if metric == 'accuracy' else (v <= threshold):
                steps = self.steps[i]
                return steps, float(sum(self.block_seconds[: steps // self.block_steps]))
        return None, None


@functools.cache
def _initializer(task: _tasks.Task) -> Callable[[jax.Array], Any]:
    # One compilation for the whole model instead of one per parameter shape.
    return jax.jit(functools.partial(_models.init_params, task.make_model))


def init_params(task: _tasks.Task, seed: int) -> Any:
    """Pure parameter tree of ``task``'s model freshly initialised from ``seed``."""
    return _initializer(task)(jax.random.key(seed))


@functools.cache
def _evaluator(task: _tasks.Task) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted (loss, accuracy) on a held-out split, shared by all runs of ``task``."""

    def evaluate(params, x, y):
        # Loss and accuracy per example, 64 examples at a time; every example has the
        # same number of targets, so the mean of per-example means is the overall mean.
        def per_example(xy):
            return _models.loss_and_accuracy(task.graphdef, params, xy[0][None], xy[1][None])

        losses, accuracies = jax.lax.map(per_example, (x, y), batch_size=64)
        return losses.mean(), accuracies.mean()

    return jax.jit(evaluate)


@functools.cache
def _gradient(task: _tasks.Task, batch_size: int) -> Callable[..., tuple[jax.Array, Any]]:
    """Jitted (loss, gradient) on the batch of step ``step``, shared by all optimizers.

    The batch depends only on (seed key, step), so every optimizer sees the same data.
    """

    def sample(key, data):
        x, y = data
        if task.is_lm:
            starts = jax.random.randint(key, (batch_size,), 0, x.shape[0] - task.context - 1)
            slice_at = functools.partial(jax.lax.dynamic_slice, x, slice_sizes=(task.context + 1,))
            window = jax.vmap(lambda s: slice_at((s,)))(starts)
            return window[:, :-1], window[:, 1:]
        idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
        return x[idx], y[idx]

    def gradient(params, data, key, step):
        x, y = sample(jax.random.fold_in(key, step), data)
        loss_and_accuracy = functools.partial(_models.loss_and_accuracy, task.graphdef)
        (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, x, y)
        return loss, grads

    return jax.jit(gradient)


class Trainer:
    """Training loop for one task, optimizer, ``(b1, b2)`` pair, step budget and batch size.

    Steps run in blocks of ``block_steps``; each block is timed on its own (the
    compilation happens before the first), and ``on_block(steps)`` is called after it
    (the progress bar).
    """

    def __init__(
        self,
        task: _tasks.Task,
        optimizer: _optimizers.Optimizer,
        betas: _optimizers.Betas,
        *,
        steps: int,
        batch_size: int,
        block_steps: int,
    ):
        if steps % block_steps:
            raise ValueError(f'steps ({steps}) must be a multiple of block_steps ({block_steps}).')
        self.task, self.optimizer, self.betas = task, optimizer, betas
        self.steps, self.batch_size, self.block_steps = steps, batch_size, block_steps
        self._update = jax.jit(self._apply_update)
        # The initial state of every optimizer here (zeros, a step count, a fixed
        # rounding seed) depends on the parameters' shapes only, not their values or
        # the learning rate, so one eager init serves every run of this trainer.
        self._initial_state = None

    def _tx(self, learning_rate: Any, weight_decay: Any) -> optax.GradientTransformation:
        hyperparameters = _optimizers.Hyperparameters(learning_rate, weight_decay, *self.betas)
        return self.optimizer.build(hyperparameters, self.steps, _models.decay_mask)

    def _apply_update(self, grads, opt_state, params, lr_wd):
        updates, opt_state = self._tx(lr_wd[0], lr_wd[1]).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(
        self,
        hyperparameters: _optimizers.Hyperparameters,
        seed: int,
        on_block: Callable[[int], None] = lambda steps: None,
        *,
        curve: bool = True,
        test: bool = True,
    ) -> RunResult:
        """Trains from ``seed`` (initialisation and batches depend on it alone).

        Args:
          hyperparameters: must have this trainer's betas.
          seed: the run's seed.
          on_block: called with the number of steps after every block, and with the
            steps left when a run diverges (so a progress bar still ends at its total).
          curve: evaluate on the validation split after every block (else only at
            the end).
          test: evaluate on the test split at the end.

        Returns:
          The ``RunResult``.
        """
        if hyperparameters.betas != self.betas:
            raise ValueError(
                f'This trainer runs betas {self.betas}, got {hyperparameters.betas}; '
                'the betas are compiled in (lion_optax.lion specialises on them).'
            )
        lr, wd = hyperparameters.learning_rate, hyperparameters.weight_decay
        gradient, evaluate = _gradient(self.task, self.batch_size), _evaluator(self.task)
        params = init_params(self.task, seed)
        if self._initial_state is None:
            self._initial_state = self._tx(lr, wd).init(params)
        opt_state = self._initial_state
        # Committed to the device like every jit output, so the first step and the
        # later ones hit the same compiled executable.
        params, opt_state, data, key, lr_wd = jax.device_put(
            (
                params,
                opt_state,
                self.task.data['train'],
                jax.random.key(seed),
                jnp.array([lr, wd], jnp.float32),
            ),
            jax.devices()[0],
        )
        # Compile (or fetch from the cache) before timing, so timed blocks hold steps only.
        jax.block_until_ready(
            self._update(*gradient(params, data, key, 0)[1:], opt_state, params, lr_wd)
        )
        steps, val_loss, val_acc, block_seconds = [], [], [], []
        diverged = False
        for start in range(0, self.steps, self.block_steps):
            t = time.perf_counter()
            for step in range(start, start + self.block_steps):
                loss, grads = gradient(params, data, key, step)
                params, opt_state = self._update(grads, opt_state, params, lr_wd)
            train_loss = float(loss)  # blocks until the block of steps is done
            block_seconds.append(time.perf_counter() - t)
            done = start + self.block_steps
            diverged = not np.isfinite(train_loss)
            if curve or done == self.steps or diverged:
                loss, acc = evaluate(params, *self.task.data['val'])
                steps.append(done)
                val_loss.append(float(loss))
                val_acc.append(float(acc))
                diverged = diverged or not np.isfinite(val_loss[-1])
            on_block(self.block_steps)
            if diverged:
                on_block(self.steps - done)
                break
        test_loss = test_acc = None
        if test:
            test_loss, test_acc = (float(v) for v in evaluate(params, *self.task.data['test']))
        return RunResult(
            self.block_steps,
            steps,
            val_loss,
            val_acc,
            block_seconds,
            test_loss,
            test_acc,
            lion_optax.hlo.tree_bytes(opt_state, per_device=False),
            lion_optax.hlo.tree_bytes(params, per_device=False),
            diverged,
        )
