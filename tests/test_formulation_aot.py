"""The step as the TPU and GPU compilers make it, compiled ahead of time on this CPU.

The accelerators' formulations of :mod:`lion_optax._src.formulation` (and the
int8 TPU kernel, :mod:`lion_optax._src.int8_kernel`) are pinned here by what
the compilers make of them: on a 16M-parameter-per-device float32 leaf, each
element-wise configuration is one kernel within 1.05x of its ideal bytes per
parameter with temporaries under 1% of the parameter bytes; a configuration
whose algorithm needs a reduction first reads what it needs once more and no
more (``'skip_step'`` <= 1.25x, cautious and the norms <= 1.4x, int8 <= 1.4x)
and copies no state. Bytes are main-memory (HBM) bytes by
``lion_optax.hlo.memory_traffic``. XLA:CPU's own formulation is pinned in
tests/test_formulation.py. The compilers come with the ``accelerators``
extra; without them these tests skip and say so.
"""

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import lion_optax
from lion_optax import hlo

LR, WD = 1e-4, 0.1
PER_DEVICE = (4096, 4096)  # 16M parameters on each device
TARGETS = ['tpu v5e', 'tpu v5p', 'tpu v4', 'gpu h100']

ELEMENTWISE = {  # name: (options, parameter dtype, ideal bytes per parameter)
    'default': ({}, jnp.float32, 20),
    'propagate': (dict(nonfinite='propagate'), jnp.float32, 20),
    'clip': (dict(kappa='clip'), jnp.float32, 20),
    'tanh': (dict(kappa='tanh'), jnp.float32, 20),
    'bf16 momentum': (dict(mu_dtype=jnp.bfloat16), jnp.float32, 16),
    'bf16 momentum nearest': (dict(mu_dtype=jnp.bfloat16,
                                   rounding=lion_optax.Rounding(momentum='nearest')),
                              jnp.float32, 16),
    'fp16 momentum': (dict(mu_dtype=jnp.float16), jnp.float32, 16),
    'bf16 params': ({}, jnp.bfloat16, 10),
    'fp16 params': ({}, jnp.float16, 10),
}
WITH_A_REDUCTION = {  # name: (options, ideal bytes, bound on the ratio)
    "nonfinite='skip_step'": (dict(nonfinite='skip_step'), 20, 1.25),
    'cautious': (dict(cautious=True), 20, 1.4),
    'l2': (dict(kappa='l2'), 20, 1.4),
    'lp(1.5)': (dict(kappa=lion_optax.lp_kappa(1.5)), 20, 1.4),
    'l2_global': (dict(kappa='l2_global'), 20, 1.4),
    'int8 momentum': (dict(mu_dtype='int8'), 14.25, 1.4),
}


def _skip_without(target):
    reason = hlo.unavailable(target)
    if reason is not None:
        pytest.skip(f'cannot compile for {target} on this machine: {reason}')


@functools.cache
def _compiled(target, name, options=None, dtype=jnp.float32, axis_types='explicit'):
    _skip_without(target)
    devices = len(hlo.target_devices(target))
    tx = lion_optax.lion(LR, weight_decay=WD, **dict(options or ()))
    leaf = jnp.zeros((PER_DEVICE[0] * devices, PER_DEVICE[1]), dtype)
    compiled = hlo.compile_step(tx, {'w': leaf}, target, axis_types=axis_types)
    return compiled, devices


def _per_parameter(compiled, devices):
    traffic = hlo.memory_traffic(compiled)
    parameters = PER_DEVICE[0] * PER_DEVICE[1] * devices
    return traffic.bytes * devices / parameters, traffic.kernels


def _state_copies(compiled):
    """Copies of arrays at least half a parameter's size (the state's) in the entry."""
    entry = compiled.as_text().split('\nENTRY', 1)[1]
    big = PER_DEVICE[0] * PER_DEVICE[1] // 2
    copies = []
    for shape in re.findall(r'= (\w+\[[\d,]+\])\S* copy\(', entry):
        dims = [int(d) for d in re.findall(r'\d+', shape.split('[')[1])]
        if dims and __import__('math').prod(dims) >= big:
            copies.append(shape)
    return copies


def _frozen(options):
    return tuple(sorted(options.items(), key=lambda kv: kv[0]))


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('name', sorted(ELEMENTWISE))
def test_an_elementwise_step_is_one_kernel_at_its_ideal_bytes(target, name):
    options, dtype, ideal = ELEMENTWISE[name]
    compiled, devices = _compiled(target, name, _frozen(options), dtype)
    per_parameter, kernels = _per_parameter(compiled, devices)
    assert kernels == 1, (kernels, per_parameter)
    assert round(per_parameter / ideal, 3) <= 1.05, per_parameter
    parameter_bytes = PER_DEVICE[0] * PER_DEVICE[1] * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.01 * parameter_bytes


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('name', sorted(WITH_A_REDUCTION))
def test_a_reduction_costs_one_more_read_and_no_copy_of_the_state(target, name):
    options, ideal, bound = WITH_A_REDUCTION[name]
    compiled, devices = _compiled(target, name, _frozen(options))
    per_parameter, _ = _per_parameter(compiled, devices)
    # To a thousandth: the step's scalars (a count, a norm) move a few bytes in all.
    assert round(per_parameter / ideal, 3) <= bound, per_parameter / ideal
    assert _state_copies(compiled) == []


@pytest.mark.parametrize('target', ['tpu v5e', 'tpu v5p', 'tpu v4'])
def test_int8_on_tpu_is_the_pallas_kernel_with_an_explicit_mesh_only(target):
    """XLA's TPU compiler transposes whole arrays for int8's block maxima (the Auto-mesh
    fallback, where the placement is unknown while tracing); the kernel does not."""
    explicit, _ = _compiled(target, 'int8', _frozen(dict(mu_dtype='int8')))
    auto, devices = _compiled(target, 'int8', _frozen(dict(mu_dtype='int8')),
                              axis_types='auto')
    assert 'tpu_custom_call' in explicit.as_text()
    assert 'tpu_custom_call' not in auto.as_text()
    assert _per_parameter(auto, devices)[0] > 2 * _per_parameter(explicit, devices)[0]


def test_the_accelerators_numbers_are_optax_lions_bit_for_bit_in_the_program():
    """On GPU the default step is optax.lion's expression: the same kernel, the
    same instructions in it (with the non-finite select in front)."""
    _skip_without('gpu h100')

    def fused(tx):
        compiled = hlo.compile_step(tx, {'w': jnp.zeros(PER_DEVICE)}, 'gpu h100')
        text = compiled.as_text()
        body = text[text.index('fused_'):text.index('\nENTRY')]
        return sorted(re.findall(r' ([a-z-]+)\(', body))

    ours = fused(lion_optax.lion(LR, weight_decay=WD, nonfinite='propagate'))
    theirs = fused(optax.lion(LR, weight_decay=WD))
    assert ours == theirs


GPT2 = dict(layers=12, width=768, vocab=50304)


def _gpt2_tree():
    d, v = GPT2['width'], GPT2['vocab']
    linear = lambda i, o: {'kernel': jnp.zeros((i, o)), 'bias': jnp.zeros(o)}  # noqa: E731
    norm = lambda: {'scale': jnp.ones(d), 'bias': jnp.zeros(d)}  # noqa: E731
    tree = {'wte': jnp.zeros((v, d)), 'wpe': jnp.zeros((1024, d)), 'ln_f': norm()}
    for i in range(GPT2['layers']):
        tree[f'h{i}'] = {'ln1': norm(), 'ln2': norm(),
                         'attn': {'qkv': linear(d, 3 * d), 'proj': linear(d, d)},
                         'mlp': {'fc': linear(d, 4 * d), 'proj': linear(4 * d, d)}}
    return jax.eval_shape(lambda: tree)


@pytest.mark.parametrize('options', [{}, dict(mu_dtype=jnp.bfloat16)], ids=['default', 'bf16'])
def test_on_a_gpt2_tree_no_more_kernels_than_optax_lion(options):
    _skip_without('gpu h100')
    tree = _gpt2_tree()
    ours = hlo.compile_step(lion_optax.lion(LR, weight_decay=WD, **options), tree, 'gpu h100')
    theirs = hlo.compile_step(optax.lion(LR, weight_decay=WD), tree, 'gpu h100')
    assert hlo.memory_traffic(ours).kernels <= hlo.memory_traffic(theirs).kernels
