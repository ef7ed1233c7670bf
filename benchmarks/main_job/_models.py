"""The benchmarks' models (Flax NNX), used as pure parameter trees.

Every benchmark trains functionally: :func:`init_params` builds a model from a seed
and keeps only its parameter tree, :func:`apply` runs the model on a tree,
:func:`loss_and_accuracy` scores it on labelled examples, and :func:`decay_mask` says
which leaves get weight decay. The same :class:`MLP` serves the main job,
``momentum_precision_digits``, ``distributed_lion`` and ``slow_link``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Builds a fresh model; called with the keyword ``rngs``.
ModelFactory = Callable[..., nnx.Module]


class MLP(nnx.Module):
    """Two hidden GELU layers with LayerNorm on flattened 8x8 images."""

    def __init__(self, hidden: int, classes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = nnx.gelu(self.norm(self.fc1(x)))
        x = nnx.gelu(self.fc2(x))
        return self.out(x)


class CNN(nnx.Module):
    """Two 3x3 convolutions, LayerNorm, 2x2 average pooling and a linear head."""

    def __init__(self, channels: int, classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels, 2 * channels, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(2 * channels, rngs=rngs)
        self.out = nnx.Linear(4 * 4 * 2 * channels, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.conv1(x))
        x = nnx.gelu(self.norm(self.conv2(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.out(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
    """Pre-LayerNorm Transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        shape = (b, t, self.heads, d // self.heads)
        attn = jax.nn.dot_product_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True
        )
        x = x + self.proj(attn.reshape(b, t, d))
        return x + self.fc_out(nnx.gelu(self.fc(self.norm2(x))))


class CharTransformer(nnx.Module):
    """A small GPT-style character language model."""

    def __init__(
        self, vocab: int, context: int, dim: int, heads: int, layers: int, *, rngs: nnx.Rngs
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------
# Models as pure functions of a parameter tree.
# ---------------------------------------------------------------------------


def graph_definition(make_model: ModelFactory) -> nnx.GraphDef:
    """The static structure of ``make_model``'s module (no parameters are allocated)."""
    return nnx.split(nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0))))[0]


def init_params(make_model: ModelFactory, key: jax.Array | int) -> Any:
    """Pure parameter tree (arrays, no ``nnx.Variable``) of a fresh model from ``key``."""
    return nnx.as_pure(nnx.split(make_model(rngs=nnx.Rngs(key)))[1])


def apply(graphdef: nnx.GraphDef, params: Any, x: jax.Array) -> jax.Array:
    """Runs the model described by ``graphdef`` with parameters ``params`` on ``x``."""
    return nnx.merge(graphdef, params)(x)


def loss_and_accuracy(
    graphdef: nnx.GraphDef, params: Any, x: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The model's mean softmax cross-entropy (in float32) and accuracy on integer ``labels``."""
    logits = apply(graphdef, params, x).astype(jnp.float32)
    loss_ = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss_, accuracy


def loss(graphdef: nnx.GraphDef, params: Any, x: jax.Array, labels: jax.Array) -> jax.Array:
    """The mean cross-entropy of :func:`loss_and_accuracy`: what training differentiates."""
    return loss_and_accuracy(graphdef, params, x, labels)[0]


# ---------------------------------------------------------------------------
# Weight-decay mask.
# ---------------------------------------------------------------------------

NO_DECAY_NAMES = ('bias', 'scale')


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay; False for biases and norm scales.

    Works on any Flax parameter tree (linen ``params`` dicts, NNX ``State`` whether its
    leaves are ``nnx.Variable`` or plain arrays): a leaf is skipped when the last
    dictionary key on its path is ``"bias"`` or ``"scale"``.

    Args:
      params: a parameter tree.

    Returns:
      A tree of Python bools with the structure of ``params``, usable as the ``mask``
      argument of ``lion_optax.lion`` / ``optax.adamw``.
    """

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not (names and names[-1] in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)
