"""The main job's problems: a dataset, a model, a training budget and a success target.

* ``digits-mlp`` and ``digits-cnn``: scikit-learn's handwritten digits (see ``_data``);
* ``char-lm``: a character-level Transformer on the standard library's ``pydoc_data``
  documentation text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from flax import nnx

from . import _data, _models


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (cache key)
class Task:
    """One benchmark problem: data, model, training budget and success target.

    ``target`` is ``(metric, threshold)``: a run reaches the target at the first
    evaluation where validation ``metric`` is at least (accuracy) or at most (loss)
    ``threshold``. ``context`` is the sequence length of a language model (its
    training split is one token stream, batches are random windows of it) and None for
    a classifier (batches are random examples).
    """

    name: str
    description: str
    make_model: _models.ModelFactory
    data: dict[str, _data.Split]
    batch_size: int
    steps: int
    eval_every: int
    target: tuple[str, float]
    context: int | None = None

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        return _models.graph_definition(self.make_model)

    @property
    def is_lm(self) -> bool:
        return self.context is not None

    def replace(self, **changes: Any) -> Task:
        return dataclasses.replace(self, **changes)


def _digits_task(name, description, make_model, steps, eval_every, batch_size) -> Task:
    return Task(
        name,
        description,
        make_model,
        _digits(),
        batch_size,
        steps,
        eval_every,
        ('accuracy', 0.96),
    )


@functools.cache
def _digits() -> dict[str, _data.Split]:
    return _data.load_digits_splits()


def digits_mlp_task(steps: int, eval_every: int, batch_size: int = 64) -> Task:
    """The MLP on scikit-learn's digits."""
    description = 'MLP 64-256-256-10 (LayerNorm, GELU) on sklearn digits'
    model = functools.partial(_models.MLP, 256, 10)
    return _digits_task('digits-mlp', description, model, steps, eval_every, batch_size)


def digits_cnn_task(steps: int, eval_every: int, batch_size: int = 64) -> Task:
    """The CNN on scikit-learn's digits."""
    description = 'CNN conv16-conv32-LayerNorm-pool-linear on sklearn digits'
    model = functools.partial(_models.CNN, 16, 10)
    return _digits_task('digits-cnn', description, model, steps, eval_every, batch_size)


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
    data = {'train': (corpus.train, np.zeros((0,), np.int32)), **held_out}
    vocab = len(corpus.vocab)

    def make_model(rngs: nnx.Rngs) -> nnx.Module:
        return _models.CharTransformer(vocab, context, dim, 4, layers, rngs=rngs)

    return Task(
        'char-lm',
        f'char Transformer ({layers} layers, width {dim}, context {context}, '
        f'vocab {vocab}) on pydoc_data text ({len(corpus.train):,} train chars)',
        make_model,
        data,
        batch_size,
        steps,
        eval_every,
        ('loss', target_loss),
        context=context,
    )
