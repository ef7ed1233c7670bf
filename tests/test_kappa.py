"""The Lion-K family: every kappa against the reference, optax parity, theory, refusals."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import lion_optax
from lion_optax._src import kappa as kappa_lib
from lion_optax._src.reference import lion_reference

from _helpers import (
    from_leaves,
    random_grads,
    random_params,
    rounding_for,
    run_trajectory,
    to_leaves,
)

STEPS = 20
BF16_STEPS = 12
LR = 1e-2
WD = 0.1


def _softsign(c):
    return c / (1.0 + jnp.abs(c))


# name, kappa given to lion, reference keyword arguments.
KAPPAS = [
    ('sign', 'sign', dict(kappa='sign')),
    ('clip', 'clip', dict(kappa='clip')),
    ('tanh', lion_optax.tanh_kappa(2.5), dict(kappa='tanh', kappa_beta=2.5)),
    ('lp1.5', lion_optax.lp_kappa(1.5), dict(kappa='lp', kappa_p=1.5)),
    ('lp1.5_global', lion_optax.lp_kappa(1.5, scope='global'),
     dict(kappa='lp', kappa_p=1.5, kappa_scope='global')),
    ('l2', 'l2', dict(kappa='lp', kappa_p=2.0)),
    ('l2_global', 'l2_global', dict(kappa='lp', kappa_p=2.0, kappa_scope='global')),
    ('custom', _softsign, dict(kappa=lambda v: v / (1.0 + abs(v)))),
]
# optax's names ('hard', 'refined', 'smooth') are checked bit for bit against
# optax below, and lp_kappa(1.0) against sign_kappa.
# Kappas with a jump at c = 0, where rounding may pick either side.
DISCONTINUOUS = ('sign',)


class ReferenceTrajectoryTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(KAPPAS)
    def test_float32_trajectory_equals_reference(self, kappa, reference_kwargs):
        """Every parameter and the momentum after 20 free-running steps, to f32 rounding.

        The reference runs in float64; float32 rounds each step to about 1e-7
        relative, and steps of size lr = 1e-2 accumulate that to well under
        rtol=1e-5, atol=1e-6 over 20 steps (a wrong kappa is off by ~lr).
        """
        tx = lion_optax.lion(LR, weight_decay=WD, kappa=kappa)
        params, grads = random_params(0), random_grads(1, STEPS)
        history, state = run_trajectory(tx, params, grads, update_fn=self.variant(tx.update))
        reference = lion_reference(
            to_leaves(random_params(0)), [to_leaves(g) for g in grads],
            learning_rate=LR, weight_decay=WD, **reference_kwargs,
        )
        for t in (0, 1, STEPS // 2, STEPS - 1):
            chex.assert_trees_all_close(
                history[t], from_leaves(reference[t].params, params), rtol=1e-5, atol=1e-6
            )
        chex.assert_trees_all_close(
            optax.tree.get(state, 'mu'), from_leaves(reference[-1].momentum, params),
            rtol=1e-5, atol=1e-6,
        )

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(KAPPAS)
    def test_bfloat16_steps_equal_reference(self, kappa, reference_kwargs):
        self._check_bfloat16_steps(kappa, reference_kwargs, self.variant)

    @chex.variants(without_jit=True)
    @parameterized.named_parameters(k for k in KAPPAS if k[0] == 'l2_global')
    def test_bfloat16_steps_equal_reference_eagerly(self, kappa, reference_kwargs):
        """Without jit, for the global kappa (eager bf16 steps are slow to dispatch;
        the jitted test covers every kappa, the float32 test every kappa eagerly)."""
        self._check_bfloat16_steps(kappa, reference_kwargs, self.variant)

    def _check_bfloat16_steps(self, kappa, reference_kwargs, variant):
        """bf16 params, grads and momentum, step by step over 12 steps.

        Each step restarts the reference (float64, bf16 storage emulated) from
        the implementation's own bf16 state. Bound per parameter, with
        ulp = 2**-7 the bf16 spacing relative to the value and 2**-8 its
        rounding error: the implementation rounds kappa(c) to bf16 (<= 2**-8
        |kappa| <= 2**-8, every kappa here has |kappa| <= 1), then rounds the
        decayed direction d = kappa + wd * p (the two roundings may land one ulp
        apart: 2**-7 |d|), so the steps differ by at most
        lr * (2**-8 + 2 * 2**-7 * |d|), and the new parameters by that plus
        one ulp of the parameter. |d| <= 1 + wd |p|. Where c = b1 m + (1 - b1) g
        is zero up to rounding, a kappa with a jump at 0 may go either way:
        2 lr (1 + wd |p|) more.
        """
        tx = lion_optax.lion(LR, weight_decay=WD, kappa=kappa)
        update = variant(tx.update)
        params = random_params(0, jnp.bfloat16)
        grads = random_grads(1, BF16_STEPS, jnp.bfloat16)
        state = tx.init(params)
        for t, g in enumerate(grads):
            momentum = optax.tree.get(state, 'mu')
            expected = lion_reference(
                to_leaves(params), [to_leaves(g)], learning_rate=LR, weight_decay=WD,
                rounding=rounding_for(jnp.bfloat16), initial_momentum=to_leaves(momentum),
                first_step=t, **reference_kwargs,
            )[0]
            before = {k: np.abs(np.asarray(v, np.float64)) for k, v in params.items()}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
            chex.assert_trees_all_equal_dtypes(params, random_params(0, jnp.bfloat16))
            want_params = from_leaves(expected.params, params)
            for name, value in params.items():
                got = np.asarray(value, np.float64)
                want = want_params[name]
                d_max = 1.0 + WD * before[name]
                bound = 2.0**-7 * np.abs(want) + LR * (2.0**-8 + 2 * 2.0**-7 * d_max) + 1e-12
                if lion_optax.Kappa.of(kappa).name in DISCONTINUOUS:
                    m64 = np.asarray(momentum[name], np.float64)
                    g64 = np.asarray(g[name], np.float64)
                    ambiguous = np.abs(0.9 * m64 + 0.1 * g64) <= 1e-6 * (np.abs(m64) + np.abs(g64))
                    bound = np.where(ambiguous, bound + 2 * LR * d_max, bound)
                np.testing.assert_array_less(np.abs(got - want), bound)
            chex.assert_trees_all_close(
                optax.tree.get(state, 'mu'), from_leaves(expected.momentum, params),
                rtol=2.0**-7, atol=1e-6,
            )


@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
class OptaxParityTest(chex.TestCase):
    """Names shared with optax.scale_by_lion(mode=...) give optax's numbers."""

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(
        ('hard', 'hard', dict(mode='hard')),
        ('smooth', 'smooth', dict(mode='smooth')),
        ('smooth_beta', lion_optax.tanh_kappa(beta=3.0), dict(mode='smooth', smooth_beta=3.0)),
        ('refined', 'refined', dict(mode='refined')),
    )
    def test_scale_by_lion_equals_optax_bit_for_bit(self, kappa, optax_kwargs):
        ours = lion_optax.scale_by_lion(b1=0.95, b2=0.98, kappa=kappa)
        theirs = optax.scale_by_lion(b1=0.95, b2=0.98, **optax_kwargs)
        # The kappa is static: one trace for the whole trajectory.
        chex.clear_trace_counter()
        ours_update = self.variant(chex.assert_max_traces(ours.update, n=1))
        theirs_update = self.variant(theirs.update)
        params = random_params(2)
        # Gradients of several scales, so that 'refined' uses both of its branches.
        grads = [jax.tree.map(lambda g, s=s: 3.0 * s * g, g)
                 for s, g in zip(np.linspace(0.1, 2.0, 12), random_grads(3, 12))]
        ours_state, theirs_state = ours.init(params), theirs.init(params)
        for g in grads:
            ours_direction, ours_state = ours_update(g, ours_state)
            theirs_direction, theirs_state = theirs_update(g, theirs_state)
            chex.assert_trees_all_equal(ours_direction, theirs_direction)
        chex.assert_trees_all_equal(ours_state.mu, theirs_state.mu)

    @parameterized.named_parameters(('smooth', 'smooth'), ('refined', 'refined'))
    def test_lion_equals_optax_chain(self, mode):
        """The whole optimizer with a non-default mode equals optax's pieces chained."""
        lr = optax.schedules.cosine_decay_schedule(3e-2, 40)
        ours = lion_optax.lion(lr, weight_decay=0.2, kappa=mode)
        theirs = optax.chain(
            optax.scale_by_lion(mode=mode), optax.add_decayed_weights(0.2),
            optax.scale_by_learning_rate(lr),
        )
        params, grads = random_params(4), random_grads(5, 40)
        ours_state, theirs_state = ours.init(params), theirs.init(params)
        ours_params = theirs_params = params
        ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
        for g in grads:
            u, ours_state = ours_update(g, ours_state, ours_params)
            ours_params = optax.apply_updates(ours_params, u)
            v, theirs_state = theirs_update(g, theirs_state, theirs_params)
            theirs_params = optax.apply_updates(theirs_params, v)
        chex.assert_trees_all_close(ours_params, theirs_params, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# The documented K and K*: Fenchel-Young equality K(z) + K*(y) = <y, z> at
# y = grad K(z), and K*(y) >= <y, z'> - K(z') for every other z' (K* is the sup).


def _huber(z):
    return np.where(np.abs(z) <= 1.0, 0.5 * z**2, np.abs(z) - 0.5)


def _entropy_conjugate(y, beta):
    if np.max(np.abs(y)) > 1.0:
        return np.inf
    with np.errstate(divide='ignore', invalid='ignore'):
        terms = (1 + y) / 2 * np.log1p(y) + (1 - y) / 2 * np.log1p(-y)
    terms = np.where(np.abs(y) == 1.0, np.log(2.0), terms)
    return np.sum(terms) / beta


def _logcosh(x):
    x = np.abs(x)
    return x + np.log1p(np.exp(-2.0 * x)) - np.log(2.0)


def _indicator(inside):
    return 0.0 if inside else np.inf


# kappa, K(z), K*(y) as documented in lion_optax._src.kappa.
CONJUGATES = [
    ('sign', kappa_lib.sign_kappa(), lambda z: np.sum(np.abs(z)),
     lambda y: _indicator(np.max(np.abs(y)) <= 1 + 1e-12)),
    ('clip', kappa_lib.clip_kappa(), lambda z: np.sum(_huber(z)),
     lambda y: 0.5 * np.sum(y**2) + _indicator(np.max(np.abs(y)) <= 1 + 1e-12)),
    ('tanh', lion_optax.tanh_kappa(2.0),
     lambda z: np.sum(_logcosh(2.0 * z)) / 2.0, lambda y: _entropy_conjugate(y, 2.0)),
    ('lp1.5', lion_optax.lp_kappa(1.5), lambda z: np.sum(np.abs(z) ** 1.5) ** (1 / 1.5),
     lambda y: _indicator(np.sum(np.abs(y) ** 3.0) ** (1 / 3.0) <= 1 + 1e-5)),
    ('l2', kappa_lib.l2_kappa(), lambda z: np.sqrt(np.sum(z**2)),
     lambda y: _indicator(np.sqrt(np.sum(y**2)) <= 1 + 1e-5)),
]


@pytest.mark.parametrize('name,kappa,k,conjugate', CONJUGATES, ids=[c[0] for c in CONJUGATES])
def test_documented_conjugate_satisfies_fenchel_young(name, kappa, k, conjugate):
    """float32 directions, checked in float64: tolerances of a few float32 ulps."""
    rng = np.random.default_rng(0)

    def direction(z):
        return np.asarray(kappa.fn(jnp.asarray(z, jnp.float32)), np.float64)

    for scale in (0.3, 1.0, 4.0):
        z = np.asarray(scale * rng.normal(size=7), np.float32).astype(np.float64)
        y = direction(z)
        # Equality at y = grad K(z): K(z) + K*(y) = <y, z>.
        np.testing.assert_allclose(k(z) + conjugate(y), y @ z, rtol=1e-5, atol=1e-5)
        # K*(y) is the supremum: no other z' does better.
        for _ in range(50):
            other = 3.0 * rng.normal(size=7)
            assert conjugate(y) >= y @ other - k(other) - 1e-5
    # Just outside the dual unit ball K* is +inf, and indeed <y, t w> - K(t w)
    # grows without bound along w for y = 1.01 grad K(w).
    z = rng.normal(size=7)
    w = np.sign(z) * 50.0 + z
    y = 1.01 * direction(w)
    assert conjugate(y) == np.inf
    assert y @ (1e6 * w) - k(1e6 * w) > 1e3


def test_every_builtin_documents_k_conjugate_and_problem():
    kappas = [lion_optax.Kappa.of(n) for n in ('sign', 'clip', 'tanh', 'l2', 'l2_global')]
    kappas += [lion_optax.lp_kappa(1.5), lion_optax.lp_kappa(1.5, scope='global')]
    for kappa in kappas:
        assert kappa.k.startswith('K(x) =')
        assert kappa.conjugate.startswith('K*(y) =')
        assert kappa.constraint.startswith('min f(x)') and '1/lambda' in kappa.constraint
        assert kappa.dual_norm is not None and kappa.scope in ('leaf', 'global')
        text = kappa.describe()
        assert kappa.k in text and kappa.conjugate in text and kappa.constraint in text
    assert kappa_lib.sign_kappa().constraint == 'min f(x) s.t. ||x||_inf <= 1/lambda'
    assert lion_optax.lp_kappa(1.5).dual_norm == pytest.approx(3.0)
    assert lion_optax.lp_kappa(1.0).dual_norm == math.inf
    assert kappa_lib.l2_kappa(scope='global').scope == 'global'
    assert kappa_lib.custom_kappa(jnp.sign).dual_norm is None


# ---------------------------------------------------------------------------
# The lp directions themselves.


@pytest.mark.parametrize('p', [1.2, 1.5, 2.0])
def test_lp_direction_has_unit_dual_norm_and_attains_the_norm(p):
    """<grad K(c), c> = ||c||_p and ||grad K(c)||_q = 1: grad K(c) is the dual-norm maximiser."""
    q = p / (p - 1)
    grads = random_grads(6, 1)[0]
    tree = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    leaf_dirs = jax.jit(lion_optax.lp_kappa(p).fn)(grads)
    for name, c in tree.items():
        u = np.asarray(leaf_dirs[name], np.float64).ravel()
        np.testing.assert_allclose(np.sum(np.abs(u) ** q) ** (1 / q), 1.0, rtol=1e-5)
        np.testing.assert_allclose(u @ c.ravel(), np.sum(np.abs(c) ** p) ** (1 / p), rtol=1e-5)
    global_dirs = jax.jit(lion_optax.lp_kappa(p, scope='global').fn)(grads)
    u = np.concatenate([np.asarray(global_dirs[k], np.float64).ravel() for k in tree])
    c = np.concatenate([tree[k].ravel() for k in tree])
    np.testing.assert_allclose(np.sum(np.abs(u) ** q) ** (1 / q), 1.0, rtol=1e-5)
    np.testing.assert_allclose(u @ c, np.sum(np.abs(c) ** p) ** (1 / p), rtol=1e-5)


@pytest.mark.parametrize('kappa', [lion_optax.lp_kappa(1.5), kappa_lib.l2_kappa(),
                                   kappa_lib.l2_kappa(scope='global')], ids=['lp', 'l2', 'l2g'])
def test_lp_direction_is_scale_invariant_without_underflow_or_overflow(kappa):
    """grad ||.||_p is 0-homogeneous: c * 1e-30 (whose squares underflow in float32)
    and c * 1e30 (whose squares overflow) give the direction of c."""
    c = {'a': jnp.array([3.0, -4.0, 0.0]), 'b': jnp.array([1.0, 2.0])}
    expected = kappa.fn(c)
    for factor in (1e-30, 1e30):
        scaled = jax.tree.map(lambda x, f=factor: x * f, c)
        chex.assert_trees_all_close(kappa.fn(scaled), expected, rtol=1e-6)


def test_lp_direction_of_zero_is_zero_and_nan_propagates():
    kappa = kappa_lib.l2_kappa()
    chex.assert_trees_all_equal(kappa.fn(jnp.zeros(3)), jnp.zeros(3))
    assert bool(jnp.all(jnp.isnan(kappa.fn(jnp.array([1.0, jnp.nan])))))
    glob = kappa_lib.l2_kappa(scope='global').fn({'a': jnp.zeros(2), 'b': jnp.zeros(0)})
    chex.assert_trees_all_equal(glob, {'a': jnp.zeros(2), 'b': jnp.zeros(0)})


def test_global_and_leaf_scopes_differ_and_global_uses_one_norm():
    c = {'a': jnp.array([3.0]), 'b': jnp.array([4.0])}
    chex.assert_trees_all_close(kappa_lib.l2_kappa().fn(c), {'a': jnp.ones(1), 'b': jnp.ones(1)})
    chex.assert_trees_all_close(
        kappa_lib.l2_kappa(scope='global').fn(c), {'a': jnp.array([0.6]), 'b': jnp.array([0.8])}
    )


def test_names_resolve_to_the_documented_kappas():
    c = jnp.asarray(np.random.default_rng(8).normal(size=9) * 2, jnp.float32)
    for names, expected in ((('sign', 'hard'), jnp.sign(c)),
                            (('clip', 'huber', 'refined'), jnp.clip(c, -1.0, 1.0)),
                            (('tanh', 'smooth'), jnp.tanh(c))):
        for name in names:
            chex.assert_trees_all_close(lion_optax.Kappa.of(name).fn(c), expected, atol=0)
    chex.assert_trees_all_equal(lion_optax.lp_kappa(1.0).fn(c), jnp.sign(c))
    chex.assert_trees_all_close(lion_optax.Kappa.of('l2').fn(c), c / jnp.linalg.norm(c),
                                rtol=1e-6)
    kappa = lion_optax.lp_kappa(1.5)
    assert lion_optax.Kappa.of(kappa) is kappa


def test_elementwise_flag_means_elementwise():
    """A kappa marked elementwise gives the same numbers on a leaf and on its pieces."""
    kappas = (kappa_lib.sign_kappa(), kappa_lib.clip_kappa(), lion_optax.tanh_kappa(),
              lion_optax.lp_kappa(1.0), kappa_lib.l2_kappa(), lion_optax.lp_kappa(1.5))

    @jax.jit
    def same_on_pieces(c):
        return [jnp.array_equal(k.fn(c), jnp.concatenate([k.fn(c[:4]), k.fn(c[4:])]))
                for k in kappas]

    c = jnp.asarray(np.random.default_rng(7).normal(size=10) * 2, jnp.float32)
    for kappa, same in zip(kappas, same_on_pieces(c)):
        assert bool(same) == kappa.elementwise, kappa.name


# ---------------------------------------------------------------------------
# Refusals at construction.


@pytest.mark.parametrize('build', [lion_optax.scale_by_lion,
                                   lambda **kw: lion_optax.lion(1e-3, **kw)],
                         ids=['scale_by_lion', 'lion'])
@pytest.mark.parametrize(
    'kappa,error,match',
    [
        ('sgn', ValueError, "kappa='sgn' is not a known kappa"),
        ('lp', ValueError, 'lp_kappa\\(p=1.5\\)'),
        ('l1', ValueError, 'needs its exponent'),
        (3, TypeError, 'has type int'),
        (None, TypeError, 'has type NoneType'),
        (lambda a, b: a, TypeError, 'cannot be called with one argument'),
    ],
)
def test_invalid_kappa_is_refused_when_built(build, kappa, error, match):
    with pytest.raises(error, match=match):
        build(kappa=kappa)


@pytest.mark.parametrize('p', [0.5, 2.5, float('nan'), float('inf'), True, 'x', None])
def test_lp_exponent_outside_range_is_refused(p):
    with pytest.raises(ValueError, match='outside \\[1, 2\\]'):
        lion_optax.lp_kappa(p)


@pytest.mark.parametrize('beta', [0.0, -1.0, float('nan'), float('inf')])
def test_tanh_sharpness_must_be_positive_and_finite(beta):
    with pytest.raises(ValueError, match='beta'):
        lion_optax.tanh_kappa(beta)


def test_bad_scope_and_bad_custom_declarations_are_refused():
    with pytest.raises(ValueError, match="scope='tree'"):
        kappa_lib.l2_kappa(scope='tree')
    with pytest.raises(ValueError, match="scope='tree'"):
        lion_optax.lp_kappa(1.5, scope='tree')
    with pytest.raises(TypeError, match='expects a callable'):
        kappa_lib.custom_kappa(2.0)
    with pytest.raises(ValueError, match='dual_norm'):
        kappa_lib.custom_kappa(jnp.sign, dual_norm=0.5)
    with pytest.raises(TypeError, match='elementwise'):
        kappa_lib.custom_kappa(jnp.sign, elementwise='yes')
    bad = kappa_lib.sign_kappa()._replace(scope='everywhere')
    with pytest.raises(ValueError, match='scope'):
        lion_optax.scale_by_lion(kappa=bad)


def test_custom_kappa_of_the_wrong_shape_fails_when_traced():
    tx = lion_optax.scale_by_lion(kappa=lambda c: jnp.sum(c))
    params = {'w': jnp.ones(3)}
    with pytest.raises(ValueError, match='returned shape \\(\\) for an input of shape \\(3,\\)'):
        tx.update(params, tx.init(params))
