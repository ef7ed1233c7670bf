"""The main job's protocol: every contestant tuned the same way, then trained on paired seeds.

Tuning (the same for every tuned optimizer: AdamW, Lion, cautious Lion):

1. a grid of learning rate x weight decay x ``(b1, b2)``: the learning rates and weight
   decays are the same numbers for every optimizer of a task; the ``(b1, b2)`` pairs
   are each optimizer's own (AdamW's b2 and Lion's b2 mean different things);
2. then ``rounds`` of refinement around the best point so far, four trials a round:
   one new learning rate on each side of the best and one new weight decay on each
   side, each at the best values of the other hyperparameters. A side where the best
   value is the edge of what was tried gets a full grid step past the edge (the
   edge-extension rule); a side with a tried neighbour gets the point halfway to it on
   a log scale. So every optimizer runs exactly the same number of trials.

Every configuration runs once per tuning seed (seeds 1000, 1001, ..., never used for
evaluation) and is scored by its final validation loss averaged over the tuning seeds
(a diverged run scores infinity). ``optax.lion`` and int8-momentum Lion reuse
``lion_optax.lion``'s choice (the same update rule).

Evaluation: every contestant trains from evaluation seeds 0..n-1 (the same
initialisation and batches for every optimizer of a seed), interleaved within each
seed so machine noise is shared, and is reported on the test split.

Batch-size sweep: at a fixed number of epochs (a larger batch takes fewer steps),
AdamW and ``lion_optax.lion`` re-tune their learning rate at every batch size by the
same rule (a grid, then ``rounds`` of two trials), keeping the weight decay and
``(b1, b2)`` each chose in the main contest on that task.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _optimizers, _tasks, _training

Hyperparameters = _optimizers.Hyperparameters
Optimizer = _optimizers.Optimizer

# The grid steps, also the steps taken past an edge.
LEARNING_RATE_STEP = math.sqrt(10.0)  # half a decade
WEIGHT_DECAY_STEP = 10.0
TUNING_SEED = 1000  # tuning seeds are TUNING_SEED, TUNING_SEED + 1, ...: never evaluation seeds
SWEEP_OPTIMIZERS = (_optimizers.ADAMW, _optimizers.LION)


def log_grid(first: float, count: int, step: float) -> tuple[float, ...]:
    """``count`` values from ``first`` on, each ``step`` times the previous."""
    return tuple(float(first * step**i) for i in range(count))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A task's batch-size sweep: batch sizes at a fixed number of epochs, and its lr grid."""

    batch_sizes: tuple[int, ...]
    epochs: float
    learning_rates: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One task's part of the job: its training length, tuning grid and batch-size sweep.

    The learning rates and weight decays are the same numbers for every tuned optimizer.
    """

    steps: int
    eval_every: int
    learning_rates: tuple[float, ...]
    weight_decays: tuple[float, ...]
    sweep: Sweep | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of one main-job configuration."""

    seeds: int  # evaluation seeds 0..seeds-1
    tuning_seeds: int
    refinement_rounds: int
    lm: dict[str, Any]  # model and data keyword arguments of _tasks.char_lm_task
    plans: dict[str, Plan]  # task name -> its plan; the job runs these tasks, in this order


def make_tasks(budget: Budget) -> list[_tasks.Task]:
    """The tasks this budget has a plan for, at its sizes."""
    makers = {
        'digits-mlp': _tasks.digits_mlp_task,
        'digits-cnn': _tasks.digits_cnn_task,
        'char-lm': functools.partial(_tasks.char_lm_task, **budget.lm),
    }
    return [makers[name](plan.steps, plan.eval_every) for name, plan in budget.plans.items()]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A grid of learning rate x weight decay x ``(b1, b2)``, then refinement rounds."""

    learning_rates: tuple[float, ...]
    weight_decays: tuple[float, ...]
    betas: tuple[_optimizers.Betas, ...]
    rounds: int
    refine_weight_decay: bool = True

    def grid(self) -> list[Hyperparameters]:
        return [
            Hyperparameters(lr, wd, *betas)
            for betas in self.betas
            for lr in self.learning_rates
            for wd in self.weight_decays
        ]

    @property
    def per_round(self) -> int:
        return 4 if self.refine_weight_decay else 2

    @property
    def configs(self) -> int:
        """Configurations tried: the grid plus every refinement round."""
        return len(self.grid()) + self.rounds * self.per_round


def neighbours(best: float, tried: Sequence[float], step: float) -> tuple[float, float]:
    """One new value on each side of ``best``: the edge-extension and refinement rule.

    On a side where ``best`` is the edge of ``tried``, a full ``step`` past it; on a side
    with a tried neighbour, halfway to the nearest one on a log scale (so the value is
    always new).
    """
    below = [v for v in tried if v < best]
    above = [v for v in tried if v > best]
    lower = math.sqrt(best * max(below)) if below else best / step
    upper = math.sqrt(best * min(above)) if above else best * step
    return lower, upper


def sweep_steps(task: _tasks.Task, sweep: Sweep, block: int = 10) -> list[int]:
    """Steps for ``sweep.epochs`` epochs at each batch size, a multiple of ``block``.

    An epoch is the training split once: the images, or for a language model the
    characters cut into ``context``-long windows.
    """
    x_train = task.data['train'][0]
    examples = len(x_train) // task.context if task.is_lm else len(x_train)
    return [
        max(block, int(round(sweep.epochs * examples / bs / block)) * block)
        for bs in sweep.batch_sizes
    ]


@dataclasses.dataclass(frozen=True)
class Phase:
    """Training runs of one length and batch size: a piece of the job's plan."""

    task: str
    sweep: bool  # a batch-size sweep point, else the main contest
    batch_size: int
    steps: int
    tuning_runs: int  # every tuned optimizer together
    evaluation_runs: int

    @property
    def total_steps(self) -> int:
        return self.steps * (self.tuning_runs + self.evaluation_runs)

    def describe(self) -> str:
        where = f'{self.task} ' + (f'sweep, batch {self.batch_size}' if self.sweep else 'contest')
        return (
            f'{where}: {self.tuning_runs} tuning + {self.evaluation_runs} evaluation runs '
            f'x {self.steps} steps (batch {self.batch_size})'
        )


def phases(budget: Budget, tasks: Sequence[_tasks.Task]) -> list[Phase]:
    """The job's plan, known before it starts (the progress bar's total comes from it)."""
    out = []
    for task in tasks:
        space = main_space(budget, task, _optimizers.ADAMW)  # the same size for all
        tuning = space.configs * budget.tuning_seeds * len(_optimizers.TUNED)
        evaluation = len(_optimizers.OPTIMIZERS) * budget.seeds
        out.append(Phase(task.name, False, task.batch_size, task.steps, tuning, evaluation))
        sweep = budget.plans[task.name].sweep
        if sweep is not None:
            # The count does not depend on the weight decay and betas kept.
            space = sweep_space(budget, sweep, Hyperparameters(1.0, 0.0, 0.9, 0.99))
            tuning = space.configs * budget.tuning_seeds * len(SWEEP_OPTIMIZERS)
            evaluation = len(SWEEP_OPTIMIZERS) * budget.seeds
            for batch_size, steps in zip(sweep.batch_sizes, sweep_steps(task, sweep)):
                out.append(Phase(task.name, True, batch_size, steps, tuning, evaluation))
    return out


def planned_steps(budget: Budget, tasks: Sequence[_tasks.Task]) -> int:
    """Training steps of the whole job."""
    return sum(phase.total_steps for phase in phases(budget, tasks))


def main_space(budget: Budget, task: _tasks.Task, optimizer: Optimizer) -> SearchSpace:
    plan = budget.plans[task.name]
    return SearchSpace(
        plan.learning_rates, plan.weight_decays, optimizer.betas, budget.refinement_rounds
    )


def sweep_space(budget: Budget, sweep: Sweep, chosen: Hyperparameters) -> SearchSpace:
    return SearchSpace(
        sweep.learning_rates,
        (chosen.weight_decay,),
        (chosen.betas,),
        budget.refinement_rounds,
        refine_weight_decay=False,
    )


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------


class Runner:
    """Runs trainings and keeps one trainer per (task, optimizer, betas, steps, batch size).

    ``bar`` is the progress bar (a ``tqdm`` whose total is ``planned_steps``); it is
    advanced after every block of steps.
    """

    def __init__(self, bar: Any):
        self.bar = bar
        self.progress_steps = 0
        self._trainers: dict[Any, _training.Trainer] = {}

    def _on_block(self, steps: int) -> None:
        self.progress_steps += steps
        self.bar.update(steps)

    def run(
        self,
        task: _tasks.Task,
        optimizer: Optimizer,
        hyperparameters: Hyperparameters,
        seed: int,
        *,
        steps: int | None = None,
        batch_size: int | None = None,
        curve: bool = False,
        test: bool = False,
    ) -> _training.RunResult:
        """One training run; ``steps`` and ``batch_size`` default to the task's.

        With a custom ``steps`` (the batch-size sweep) a run is timed in 10 blocks.
        """
        steps = steps or task.steps
        batch_size = batch_size or task.batch_size
        key = (task, optimizer, hyperparameters.betas, steps, batch_size)
        if key not in self._trainers:
            block = task.eval_every if steps == task.steps else steps // 10
            self._trainers[key] = _training.Trainer(
                task,
                optimizer,
                hyperparameters.betas,
                steps=steps,
                batch_size=batch_size,
                block_steps=block,
            )
        trainer = self._trainers[key]
        return trainer.run(hyperparameters, seed, self._on_block, curve=curve, test=test)


@dataclasses.dataclass
class Tuning:
    """One optimizer's tuning on one task: every trial, and the configuration chosen."""

    optimizer: Optimizer
    space: SearchSpace
    seeds: list[int]
    trials: list[dict[str, Any]]
    chosen: Hyperparameters
    chosen_val_loss: float

    def as_dict(self) -> dict[str, Any]:
        return dict(
            optimizer=self.optimizer.label,
            learning_rates=list(self.space.learning_rates),
            weight_decays=list(self.space.weight_decays),
            betas=[list(b) for b in self.space.betas],
            refinement_rounds=self.space.rounds,
            refine_weight_decay=self.space.refine_weight_decay,
            seeds=self.seeds,
            configs=self.space.configs,
            runs=len(self.trials),
            chosen=dataclasses.asdict(self.chosen),
            chosen_val_loss=self.chosen_val_loss,
            chosen_at_edge=self.edges(),
        )

    def edges(self) -> dict[str, str | None]:
        """Where a chosen value is the lowest or highest tried ('lower', 'upper', None).

        A value at an edge after refinement means the optimum may lie beyond: read it as
        a bound. The weight decay of a sweep is not tuned, so it has no edge.
        """
        out = {}
        for name in ('learning_rate', 'weight_decay'):
            tried = {t[name] for t in self.trials}
            value = getattr(self.chosen, name)
            if name == 'weight_decay' and not self.space.refine_weight_decay:
                out[name] = None
            elif value == min(tried):
                out[name] = 'lower'
            elif value == max(tried):
                out[name] = 'upper'
            else:
                out[name] = None
        return out


def tune(
    runner: Runner,
    task: _tasks.Task,
    optimizer: Optimizer,
    space: SearchSpace,
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    batch_size: int | None = None,
) -> Tuning:
    """Tunes ``optimizer`` on ``task`` over ``space`` (see the module docstring)."""
    trials: list[dict[str, Any]] = []
    scores: dict[Hyperparameters, float] = {}

    def score(configs: Sequence[Hyperparameters], stage: str) -> None:
        for config in configs:
            losses = []
            for seed in seeds:
                run = runner.run(task, optimizer, config, seed, steps=steps, batch_size=batch_size)
                losses.append(run.final_val_loss)
                trials.append(
                    dict(
                        optimizer=optimizer.label,
                        learning_rate=config.learning_rate,
                        weight_decay=config.weight_decay,
                        b1=config.b1,
                        b2=config.b2,
                        seed=seed,
                        stage=stage,
                        val_loss=run.val_loss[-1],
                        val_accuracy=run.val_accuracy[-1],
                        diverged=run.diverged,
                    )
                )
            scores[config] = float(np.mean(losses))

    def best() -> Hyperparameters:
        return min(scores, key=scores.get)  # the first of equals, in trial order

    score(space.grid(), 'grid')
    for round_ in range(1, space.rounds + 1):
        current = best()
        lrs = neighbours(
            current.learning_rate, [c.learning_rate for c in scores], LEARNING_RATE_STEP
        )
        candidates = [dataclasses.replace(current, learning_rate=lr) for lr in lrs]
        if space.refine_weight_decay:
            wds = neighbours(
                current.weight_decay, [c.weight_decay for c in scores], WEIGHT_DECAY_STEP
            )
            candidates += [dataclasses.replace(current, weight_decay=wd) for wd in wds]
        score(candidates, f'refinement {round_}')
    chosen = best()
    return Tuning(optimizer, space, list(seeds), trials, chosen, scores[chosen])


def chosen_for(optimizer: Optimizer, tunings: dict[Optimizer, Tuning]) -> Hyperparameters:
    """The tuned hyperparameters of ``optimizer`` (its own, or those it reuses)."""
    return tunings[optimizer.tuned_as or optimizer].chosen


def evaluate(
    runner: Runner,
    task: _tasks.Task,
    configs: dict[Optimizer, Hyperparameters],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    curve: bool = True,
) -> dict[Optimizer, list[_training.RunResult]]:
    """Runs every config on every seed, interleaving the optimizers within each seed."""
    runs: dict[Optimizer, list[_training.RunResult]] = {o: [] for o in configs}
    for seed in seeds:
        for optimizer, config in configs.items():
            runs[optimizer].append(
                runner.run(
                    task,
                    optimizer,
                    config,
                    seed,
                    steps=steps,
                    batch_size=batch_size,
                    curve=curve,
                    test=True,
                )
            )
    return runs


def tuning_seeds(budget: Budget) -> list[int]:
    return [TUNING_SEED + i for i in range(budget.tuning_seeds)]


def contest(runner: Runner, task: _tasks.Task, budget: Budget, describe=print) -> dict[str, Any]:
    """Tunes every tuned optimizer on ``task``, then evaluates every contestant.

    Returns:
      ``dict(tunings={optimizer: Tuning}, runs={optimizer: [RunResult per seed]},
      seeds=[...])``.
    """
    tunings = {}
    for optimizer in _optimizers.TUNED:
        describe(f'{task.name}: tuning {optimizer.label}')
        space = main_space(budget, task, optimizer)
        tunings[optimizer] = tune(runner, task, optimizer, space, tuning_seeds(budget))
    describe(f'{task.name}: {budget.seeds} seeds')
    seeds = list(range(budget.seeds))
    configs = {o: chosen_for(o, tunings) for o in _optimizers.OPTIMIZERS}
    return dict(tunings=tunings, runs=evaluate(runner, task, configs, seeds), seeds=seeds)


def batch_sweep(
    runner: Runner,
    task: _tasks.Task,
    budget: Budget,
    tunings: dict[Optimizer, Tuning],
    describe=print,
) -> list[dict[str, Any]]:
    """Re-tunes AdamW's and Lion's learning rate at every batch size, then evaluates both.

    Returns:
      One ``dict(batch_size, steps, tunings, runs, seeds)`` per batch size.
    """
    sweep = budget.plans[task.name].sweep
    seeds = list(range(budget.seeds))
    points = []
    for batch_size, steps in zip(sweep.batch_sizes, sweep_steps(task, sweep)):
        describe(f'{task.name} batch sweep: {batch_size}')
        point_tunings = {
            o: tune(
                runner,
                task,
                o,
                sweep_space(budget, sweep, tunings[o].chosen),
                tuning_seeds(budget),
                steps=steps,
                batch_size=batch_size,
            )
            for o in SWEEP_OPTIMIZERS
        }
        configs = {o: t.chosen for o, t in point_tunings.items()}
        runs = evaluate(
            runner, task, configs, seeds, steps=steps, batch_size=batch_size, curve=False
        )
        points.append(
            dict(batch_size=batch_size, steps=steps, tunings=point_tunings, runs=runs, seeds=seeds)
        )
    return points
