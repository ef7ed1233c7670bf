"""Tests of the sign aggregation (lion_optax/_src/sign_aggregation.py).

The packing of ternary (vote) and base-2N+1 (average) digits into uint32 words,
the layout and traffic that ``lion_optax.hlo.sign_layout`` predicts, and
``aggregate_signs`` under ``vmap`` with simulated workers against NumPy. The
whole optimizer built on it is tested in ``test_distributed.py``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lion_optax
from lion_optax._src import sign_aggregation

# --- packing ---------------------------------------------------------------


@pytest.mark.parametrize('base, expected', [(3, 20), (17, 7), (513, 3), (2, 32)])
def test_digits_per_word_is_the_largest_that_fits_uint32(base, expected):
    k = sign_aggregation.digits_per_word(base)
    assert k == expected
    assert base**k <= 2**32 < base ** (k + 1)


@pytest.mark.parametrize('base', [3, 5, 17, 257, 513])
def test_pack_unpack_round_trip_at_the_extremes(base):
    k = sign_aggregation.digits_per_word(base)
    rng = np.random.default_rng(base)
    digits = rng.integers(0, base, size=(50, k)).astype(np.uint32)
    digits[0] = base - 1  # the largest packed value, base**k - 1
    digits[1] = 0
    words = sign_aggregation.pack_digits(jnp.asarray(digits), base)
    assert words.dtype == jnp.uint32
    assert int(words[0]) == base**k - 1
    np.testing.assert_array_equal(sign_aggregation.unpack_digits(words, base, k), digits)


@pytest.mark.parametrize('method', ['vote', 'average'])
def test_unpacking_needs_one_division_per_16_bit_part(method):
    """The speed of the aggregation on the CPU, as a structural fact: a word's 20
    ternary digits come from one uint32 division (into two 16-bit parts) and
    float arithmetic (``unpack_digit_planes``), not from 19 chained integer
    divisions, which XLA put in a kernel each (38 divisions a step before)."""
    tx = lion_optax.aggregate_signs('workers', method=method)
    step = jax.jit(jax.vmap(lambda u: tx.update(u, tx.init(u))[0], axis_name='workers'))
    text = step.lower({'w': jnp.ones((2, 10_000)), 'b': jnp.ones((2, 30))}).compile().as_text()
    divisions = re.findall(r'= [us]\d+\[[^\]]*\]\S* (?:divide|remainder)\(', text)
    # Two unpackings (the received signs, the gathered result): one part boundary
    # for base 3 (10 + 10 digits), two for the average's base 5 (6 + 6 + 1).
    assert len(divisions) <= (2 if method == 'vote' else 3), divisions


def test_leaves_are_packed_in_whole_words():
    """sign_layout with the leaves' sizes gives the exact padding of aggregate_signs
    (each leaf in whole words of 20 signs); with their total, the one-leaf case."""
    assert lion_optax.hlo.sign_layout(3, 1).shard_digits == 20
    assert lion_optax.hlo.sign_layout([1, 1, 1], 1).shard_digits == 60
    assert lion_optax.hlo.sign_layout([40, 0, 20], 2).shard_digits == 40
    # Slices hold whole result words: lcm(20, 13) = 260 digits for the average at N = 2.
    assert lion_optax.hlo.sign_layout([1], 2, 'average').shard_digits == 260
    with pytest.raises(ValueError, match='leaf sizes'):
        lion_optax.hlo.sign_layout([0, 0], 2)
    with pytest.raises(ValueError, match='leaf sizes'):
        lion_optax.hlo.sign_layout([5, -1], 2)


# --- traffic analysis -------------------------------------------------------


def test_sign_layout_traffic_meets_the_target_and_stays_flat():
    params = 10**8
    vote8 = lion_optax.hlo.sign_layout(params, 8, 'vote')
    avg8 = lion_optax.hlo.sign_layout(params, 8, 'average')
    # At most 1/6 of a float32 ring all-reduce of the same parameters.
    assert vote8.bytes_sent_per_device * 6 <= vote8.fp32_allreduce_bytes
    assert avg8.bytes_sent_per_device * 6 <= avg8.fp32_allreduce_bytes
    # 1.6 bits out and 1.6 bits back per parameter for the vote.
    np.testing.assert_allclose(vote8.bytes_sent_per_device, 7 / 8 * 0.4 * params, rtol=1e-3)
    vote256 = lion_optax.hlo.sign_layout(params, 256, 'vote')
    avg256 = lion_optax.hlo.sign_layout(params, 256, 'average')
    # Flat in the number of workers (an all_gather of everyone's signs would be 32x).
    assert vote256.bytes_sent_per_device < 1.15 * vote8.bytes_sent_per_device
    assert vote256.fp32_allreduce_bytes / vote256.bytes_sent_per_device > 19.9
    # The average needs log2(513) bits per result: 3 base-513 digits per word.
    assert avg256.out_per_word == 3
    assert avg256.bytes_sent_per_device < 2.5 * avg8.bytes_sent_per_device
    assert avg256.fp32_allreduce_bytes / avg256.bytes_sent_per_device > 5


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(num_params=0, num_workers=8), ValueError),
        (dict(num_params=10, num_workers=0), ValueError),
        (dict(num_params=10, num_workers=8, method='median'), ValueError),
    ],
)
def test_sign_layout_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        lion_optax.hlo.sign_layout(**kwargs)


# --- aggregation with simulated workers (vmap) --------------------------------


def _aggregate_with_vmap(tx, directions):
    return jax.jit(jax.vmap(lambda u: tx.update(u, tx.init(u))[0], axis_name='workers'))(directions)


@pytest.mark.parametrize('workers', [8, 20])  # 20: past the vote's unrolled count (16)
@pytest.mark.parametrize('method', ['vote', 'average'])
def test_aggregate_signs_matches_numpy_with_ties_zeros_and_nan(method, workers):
    rng = np.random.default_rng(0)
    u = {
        'a': rng.normal(size=(workers, 9, 5)).astype(np.float32),
        'b': np.sign(rng.normal(size=(workers, 11))).astype(np.float32),
    }
    u['a'][:, 0, :] = 0.0  # sign(0) = 0 everywhere
    u['b'][: workers // 2, 0], u['b'][workers // 2 :, 0] = 1.0, -1.0  # an exact tie
    u['a'][2, 1, 1] = np.nan  # worker 2 abstains on this coordinate
    out = _aggregate_with_vmap(lion_optax.aggregate_signs('workers', method=method), u)
    for k, v in u.items():
        total = np.sign(np.nan_to_num(v)).sum(axis=0)
        expected = np.sign(total) if method == 'vote' else total / workers
        got = np.asarray(out[k])
        np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))
    assert np.asarray(out['b'])[0, 0] == 0.0  # the tie gives no step
    if method == 'vote':
        assert set(np.unique(np.asarray(out['a']))) <= {-1.0, 0.0, 1.0}


def test_aggregate_signs_keeps_each_leaf_dtype():
    u = {
        'f32': jnp.ones((3, 4), jnp.float32),
        'bf16': -jnp.ones((3, 2), jnp.bfloat16),
    }
    out = _aggregate_with_vmap(lion_optax.aggregate_signs('workers', method='average'), u)
    assert out['f32'].dtype == jnp.float32 and out['bf16'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out['bf16'], np.float32), -1.0)


def test_aggregate_signs_refuses_bad_options():
    with pytest.raises(ValueError, match='method'):
        lion_optax.aggregate_signs('data', method='mean')
    with pytest.raises(TypeError, match='axis_name'):
        lion_optax.aggregate_signs(('data', 'pod'))
