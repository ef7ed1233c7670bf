"""Parameter trees shaped like real models, for compile-time and structure checks.

``gpt_tree(blocks)``: GPT-2 layout (per block two LayerNorms, qkv/proj/fc/proj
kernels and biases; 12 blocks = 148 leaves). ``vit_tree(blocks)``: ViT layout
(patch embedding, class token, position embedding, per block two LayerNorms,
qkv/proj/fc1/fc2 kernels and biases, final norm and head). ``abstract_gpt(**sizes)``:
``gpt_tree``'s shapes and dtypes, nothing allocated (a 1B-parameter tree costs nothing).
"""

import functools

import jax
import jax.numpy as jnp


def _linear(fan_in: int, fan_out: int) -> dict:
    return {'kernel': jnp.zeros((fan_in, fan_out)), 'bias': jnp.zeros(fan_out)}


def _norm(width: int) -> dict:
    return {'scale': jnp.ones(width), 'bias': jnp.zeros(width)}


def _transformer_block(width: int, norms: tuple[str, str], mlp: tuple[str, str]) -> dict:
    """Two norms, attention (qkv, proj) and a 4x MLP, under the model's own names."""
    return {
        norms[0]: _norm(width), norms[1]: _norm(width),
        'attn': {'qkv': _linear(width, 3 * width), 'proj': _linear(width, width)},
        'mlp': {mlp[0]: _linear(width, 4 * width), mlp[1]: _linear(4 * width, width)},
    }


def gpt_tree(blocks: int, width: int = 64, vocab: int = 512, context: int = 128) -> dict:
    params = {'wte': jnp.zeros((vocab, width)), 'wpe': jnp.zeros((context, width)),
              'ln_f': _norm(width)}
    for i in range(blocks):
        params[f'h{i}'] = _transformer_block(width, ('ln1', 'ln2'), ('fc', 'proj'))
    return params


def abstract_gpt(**sizes: int) -> dict:
    """``gpt_tree(**sizes)`` as ``jax.ShapeDtypeStruct`` leaves (float32), without allocating it."""
    return jax.eval_shape(functools.partial(gpt_tree, **sizes))


def vit_tree(blocks: int, width: int = 64, patch: int = 16, channels: int = 3,
             tokens: int = 197, classes: int = 1000) -> dict:
    params = {
        'patch_embed': {'kernel': jnp.zeros((patch, patch, channels, width)),
                        'bias': jnp.zeros(width)},
        'cls_token': jnp.zeros((1, 1, width)),
        'pos_embed': jnp.zeros((1, tokens, width)),
        'norm': _norm(width),
        'head': _linear(width, classes),
    }
    for i in range(blocks):
        params[f'block{i}'] = _transformer_block(width, ('norm1', 'norm2'), ('fc1', 'fc2'))
    return params
