"""Constraint diagnostics, and the constraint view of Lion-K checked numerically.

Chen, Liu, Liang and Liu (2023): with decoupled weight decay lambda, Lion-K
solves min f(x) + K*(lambda x) / lambda; for every built-in kappa the iterates
enter the ball ||x||_q <= 1/lambda and then minimise f there.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import lion_optax
from lion_optax._src import kappa as kappa_lib

# ---------------------------------------------------------------------------
# The diagnostics on hand-made parameters.


def test_box_diagnostics_per_leaf_and_overall():
    params = {'w': jnp.array([[0.5, -2.0], [1.0, 0.995]]), 'b': jnp.array([0.1, -0.2, 0.3])}
    d = lion_optax.constraint_diagnostics(params, weight_decay=1.0)
    assert float(d.scaled_norm) == 2.0  # lambda * max |theta|
    assert float(d.distance) == 1.0  # 2.0 - 1/lambda
    # |theta| >= 0.99: -2.0, 1.0 and 0.995 in 'w' (3 of 4), none in 'b'.
    np.testing.assert_allclose(float(d.at_bound_fraction), 3 / 7)
    chex.assert_trees_all_close(d.leaf_scaled_norm, {'w': 2.0, 'b': 0.3})
    chex.assert_trees_all_close(d.leaf_distance, {'w': 1.0, 'b': 0.0})
    chex.assert_trees_all_close(d.leaf_at_bound_fraction, {'w': 0.75, 'b': 0.0})
    strict = lion_optax.constraint_diagnostics(params, weight_decay=1.0, rtol=0.0)
    np.testing.assert_allclose(float(strict.at_bound_fraction), 2 / 7)


@pytest.mark.parametrize('kappa', ['sign', 'clip', 'tanh', lion_optax.tanh_kappa(3.0),
                                   lion_optax.lp_kappa(1.0)])
def test_every_box_kappa_has_the_same_feasible_set(kappa):
    params = {'w': jnp.array([0.5, -3.0])}
    d = lion_optax.constraint_diagnostics(params, weight_decay=0.5, kappa=kappa)
    assert float(d.scaled_norm) == 1.5 and float(d.distance) == 1.0


def _numpy_norm(x, q):
    x = np.abs(np.asarray(x, np.float64)).ravel()
    return x.max(initial=0.0) if q == math.inf else np.sum(x**q) ** (1 / q)


@pytest.mark.parametrize('p,scope', [(2.0, 'leaf'), (2.0, 'global'), (1.5, 'leaf'),
                                     (1.5, 'global')])
def test_ball_diagnostics_match_numpy(p, scope):
    q = p / (p - 1)
    rng = np.random.default_rng(0)
    params = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              'b': jnp.asarray(0.1 * rng.normal(size=5), jnp.float32),
              'c': jnp.asarray(rng.normal(size=2), jnp.float32)}
    mask = {'a': True, 'b': True, 'c': False}
    lam = 0.4
    d = lion_optax.constraint_diagnostics(
        params, weight_decay=lam, kappa=lion_optax.lp_kappa(p, scope=scope), mask=mask)
    norms = {k: _numpy_norm(v, q) for k, v in params.items()}
    for k in ('a', 'b'):
        np.testing.assert_allclose(float(d.leaf_scaled_norm[k]), lam * norms[k], rtol=1e-6)
        np.testing.assert_allclose(float(d.leaf_distance[k]), max(0.0, norms[k] - 1 / lam),
                                   rtol=1e-6, atol=1e-7)
    # An array without decay has no constraint.
    assert float(d.leaf_scaled_norm['c']) == 0.0 and float(d.leaf_distance['c']) == 0.0
    if scope == 'leaf':
        expected_norm = max(norms['a'], norms['b'])
        active = {k: float(lam * norms[k] >= 0.99) for k in ('a', 'b')}
        expected_fraction = (12 * active['a'] + 5 * active['b']) / 17
        assert float(d.leaf_at_bound_fraction['a']) == active['a']
    else:
        expected_norm = _numpy_norm(np.concatenate(
            [np.ravel(params['a']), np.ravel(params['b'])]), q)
        expected_fraction = float(lam * expected_norm >= 0.99)
        assert float(d.leaf_at_bound_fraction['b']) == expected_fraction
    np.testing.assert_allclose(float(d.scaled_norm), lam * expected_norm, rtol=1e-6)
    np.testing.assert_allclose(float(d.distance), max(0.0, expected_norm - 1 / lam), rtol=1e-6)
    np.testing.assert_allclose(float(d.at_bound_fraction), expected_fraction)
    assert float(d.leaf_at_bound_fraction['c']) == 0.0


def test_no_decay_means_no_constraint_and_no_nan():
    params = {'w': jnp.array([5.0, -7.0])}
    for lam in (0.0, jnp.float32(0.0)):
        d = lion_optax.constraint_diagnostics(params, weight_decay=lam, kappa='l2')
        assert (float(d.scaled_norm), float(d.distance), float(d.at_bound_fraction)) == (0, 0, 0)
    d = lion_optax.constraint_diagnostics(params, weight_decay=1.0, mask={'w': False})
    assert (float(d.scaled_norm), float(d.distance), float(d.at_bound_fraction)) == (0, 0, 0)
    d = lion_optax.constraint_diagnostics({}, weight_decay=1.0)
    assert float(d.scaled_norm) == 0.0


def test_fully_decoupled_decay_is_converted_to_the_paper_lambda():
    params = {'w': jnp.array([3.0, -1.0])}
    paper = lion_optax.constraint_diagnostics(params, weight_decay=0.5)
    decoupled = lion_optax.constraint_diagnostics(
        params, weight_decay=0.5e-3,
        weight_decay_convention=lion_optax.FullyDecoupled(reference_learning_rate=1e-3))
    chex.assert_trees_all_close(paper, decoupled)


def test_huge_and_tiny_parameters_do_not_overflow():
    d = lion_optax.constraint_diagnostics({'w': jnp.array([3e30, 4e30])}, weight_decay=1e-30,
                                          kappa='l2')
    np.testing.assert_allclose(float(d.scaled_norm), 5.0, rtol=1e-6)
    d = lion_optax.constraint_diagnostics({'w': jnp.array([3e-30, 4e-30])}, weight_decay=1e29,
                                          kappa='l2')
    np.testing.assert_allclose(float(d.scaled_norm), 0.5, rtol=1e-6)


def test_diagnostics_jit_vmap_bf16_and_logging():
    params = {'layer': {'w': jnp.array([1.0, -4.0], jnp.bfloat16)}, 'b': jnp.array([0.5])}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def diagnose(params, lam):
        return lion_optax.constraint_diagnostics(params, weight_decay=lam)

    d = diagnose(params, 0.5)
    d = diagnose(params, 0.25)  # a traced weight decay: no retrace
    assert float(d.scaled_norm) == 1.0 and d.scaled_norm.dtype == jnp.float32
    logged = d.as_dict()
    assert set(logged) == {
        'constraint/scaled_norm', 'constraint/distance', 'constraint/at_bound_fraction',
        'constraint/layer/w/scaled_norm', 'constraint/layer/w/distance',
        'constraint/layer/w/at_bound_fraction', 'constraint/b/scaled_norm',
        'constraint/b/distance', 'constraint/b/at_bound_fraction'}
    assert float(logged['constraint/layer/w/at_bound_fraction']) == 0.5
    stacked = {'w': jnp.array([[1.0, 3.0], [0.5, 0.5]])}
    per_row = jax.vmap(
        lambda p: lion_optax.constraint_diagnostics(p, weight_decay=0.5).distance)(stacked)
    chex.assert_trees_all_close(per_row, jnp.array([1.0, 0.0]))


def test_invalid_options_are_refused():
    params = {'w': jnp.ones(2)}
    with pytest.raises(ValueError, match='does not declare its feasible set'):
        lion_optax.constraint_diagnostics(params, weight_decay=0.1, kappa=lambda c: c)
    with pytest.raises(TypeError, match='schedule'):
        lion_optax.constraint_diagnostics(params, weight_decay=lambda t: 0.1)
    with pytest.raises(ValueError, match='weight_decay=-1'):
        lion_optax.constraint_diagnostics(params, weight_decay=-1.0)
    with pytest.raises(ValueError, match='rtol'):
        lion_optax.constraint_diagnostics(params, weight_decay=0.1, rtol=1.0)
    with pytest.raises(ValueError, match='reference_learning_rate'):
        lion_optax.constraint_diagnostics(
            params, weight_decay=0.1, weight_decay_convention='fully_decoupled'
        )
    with pytest.raises(ValueError, match="weight_decay_convention='weird'"):
        lion_optax.constraint_diagnostics(params, weight_decay=0.1, weight_decay_convention='weird')
    # lion_optax 0.2's keyword still works, with a warning that says what to write.
    with pytest.warns(DeprecationWarning, match='write weight_decay_convention=...'):
        with pytest.raises(ValueError, match='reference_learning_rate'):
            lion_optax.constraint_diagnostics(params, weight_decay=0.1, convention='fully_decoupled')
    with pytest.raises(ValueError, match='mask does not match'):
        lion_optax.constraint_diagnostics(params, weight_decay=0.1, mask={'v': True})
    with pytest.raises(TypeError, match='concrete bool'):
        lion_optax.constraint_diagnostics(params, weight_decay=0.1, mask={'w': 'yes'})
    declared = kappa_lib.custom_kappa(lambda c: c, dual_norm=math.inf)
    d = lion_optax.constraint_diagnostics(params, weight_decay=0.5, kappa=declared,
                                          mask=lambda p: {'w': True})
    assert float(d.scaled_norm) == 0.5


# ---------------------------------------------------------------------------
# The theory, on f(x) = sum_i h_i (x_i - a_i)^2 / 2 (h = 1 where the solution
# is a projection).

LAM = 0.5  # the radius of the feasible set is 1 / LAM = 2
LR_PEAK = 0.05
WARM, DECAY, STEPS = 600, 1000, 1900
FINAL_LRS = (1e-2, 2e-3)


def _schedule(final_lr):
    """lr_peak for WARM steps, cosine to final_lr over DECAY steps, then final_lr."""

    def schedule(count):
        frac = jnp.clip((count - WARM) / DECAY, 0.0, 1.0)
        return final_lr + (LR_PEAK - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def _learning_rates(final_lr):
    return np.asarray(_schedule(final_lr)(jnp.arange(STEPS)), np.float64)


def _run(kappa, x0, target, curvature):
    """Trajectories of lion on the quadratic, one per final lr in FINAL_LRS (one compile)."""

    def one(final_lr):
        tx = lion_optax.lion(_schedule(final_lr), weight_decay=LAM, kappa=kappa)

        def step(carry, _):
            x, state = carry
            grads = jax.tree.map(lambda x, a, h: h * (x - a), x, target, curvature)
            updates, state = tx.update(grads, state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), x

        return jax.lax.scan(step, (x0, tx.init(x0)), None, length=STEPS)[1]

    trajectories = jax.jit(jax.vmap(one))(jnp.asarray(FINAL_LRS, jnp.float32))
    return [jax.tree.map(lambda t, i=i: np.asarray(t[i], np.float64), trajectories)
            for i in range(len(FINAL_LRS))]


def _check_entry(kappa, x0, trajectory, final_lr, field='distance'):
    """The distance to the feasible set contracts at least by (1 - lr_t lambda) per step.

    For ||x_t||_q > 1/lambda and any direction with ||u||_q <= 1 (every
    built-in kappa), ||x_t - lr_t (u + lambda x_t)||_q <= (1 - lr_t lambda)
    ||x_t||_q + lr_t, i.e. dist_{t+1} <= (1 - lr_t lambda) dist_t; and a point
    inside stays inside. So dist_t <= prod_{s<t} (1 - lr_s lambda) dist_0, up to
    float32 rounding: each step rounds each coordinate by at most
    2**-22 (|x| + 1) (four roundings of values <= |x| + lr (1 + lambda |x|)),
    n**(1/q) (|x|max + 1) 2**-22 in the q-norm, and the contraction damps
    the accumulated error like the distance: slack_{t+1} = (1 - lr_t lambda)
    slack_t + eps_t.
    """
    q = lion_optax.Kappa.of(kappa).dual_norm
    # Distances in numpy, (steps, arrays); at the start from the diagnostics.
    leaves = jax.tree.leaves(trajectory)
    norms = np.stack([_numpy_norm_rows(leaf.reshape(STEPS, -1), q) for leaf in leaves], -1)
    if field == 'distance':  # one ball over the whole tree
        norms = _numpy_norm_rows(norms, q)[:, None]
    distances = np.maximum(norms - 1 / LAM, 0.0)
    start = np.asarray(jax.tree.leaves(getattr(
        lion_optax.constraint_diagnostics(x0, weight_decay=LAM, kappa=kappa), field)), np.float64)
    assert np.all(start > 3.0)  # far outside
    rates = _learning_rates(final_lr)
    n = max(np.size(leaf) for leaf in jax.tree.leaves(x0))
    largest = np.max(np.stack([np.abs(leaf).reshape(STEPS, -1).max(-1)
                               for leaf in jax.tree.leaves(trajectory)]), 0)
    contraction = 1.0 - rates * LAM
    bound = np.cumprod(contraction)[:, None] * start
    slack = np.zeros(STEPS)
    for t in range(STEPS):
        epsilon = n ** (1.0 / q) * (largest[t] + 1) * 2.0**-22
        slack[t] = (slack[t - 1] if t else 0.0) * contraction[t] + epsilon
    np.testing.assert_array_less(distances, bound + slack[:, None] + 1e-12)
    # Fast: within 0.1% of the radius while the learning rate is still at its peak.
    entered = np.argmax(np.all(distances <= 1e-3 / LAM, axis=-1))
    assert 0 < entered < WARM, entered
    return distances


def _numpy_norm_rows(x, q):
    x = np.abs(x)
    return x.max(-1) if q == math.inf else np.sum(x**q, -1) ** (1 / q)


def _final_tolerance(final_lr, solution_norm):
    """Two steps at the final learning rate.

    A step moves x by lr_T (u + lambda x) with ||u||_q <= 1, at most
    lr_T (1 + lambda ||x*||) near the solution. Smooth kappas converge to their
    fixed point (measured: 1e-5 of this); sign and l2 at an interior minimiser
    oscillate across it, reaching under one step from it (measured: up to 0.98
    of a step for sign, 0.45 for l2, over both final lrs); we allow two.
    """
    return 2.0 * final_lr * (1.0 + LAM * solution_norm)


def _box_problem():
    rng = np.random.default_rng(0)
    n = 64
    # Half the targets inside the box, half outside, none within 0.2 of its edge.
    magnitude = np.concatenate([rng.uniform(0.0, 1.8, n // 2), rng.uniform(2.3, 4.0, n // 2)])
    target = rng.choice([-1.0, 1.0], n) * magnitude
    curvature = rng.uniform(0.5, 2.0, n)
    x0 = 10.0 * rng.choice([-1.0, 1.0], n)
    as_tree = lambda v: {'x': jnp.asarray(v, jnp.float32)}  # noqa: E731
    return as_tree(x0), as_tree(target), as_tree(curvature)


def test_sign_enters_the_box_then_converges_to_the_clipped_minimiser():
    """Lion solves min f s.t. ||x||_inf <= 1/lambda: for a separable quadratic,
    x* = clip(a, -1/lambda, 1/lambda), whatever the curvatures."""
    x0, target, curvature = _box_problem()
    solution = np.clip(np.asarray(target['x'], np.float64), -1 / LAM, 1 / LAM)
    for final_lr, trajectory in zip(FINAL_LRS, _run('sign', x0, target, curvature)):
        _check_entry('sign', x0, trajectory, final_lr)
        final = trajectory['x'][-1]
        tolerance = _final_tolerance(final_lr, np.abs(solution))
        np.testing.assert_array_less(np.abs(final - solution), tolerance)
        # The diagnostics see the solution: half the coordinates on the bound.
        d = lion_optax.constraint_diagnostics({'x': jnp.asarray(final, jnp.float32)},
                                              weight_decay=LAM)
        assert float(d.at_bound_fraction) == 0.5
        assert float(d.distance) < 1e-5


def _solve_scalar(objective, target, curvature):
    """argmin over |x| <= 1/lambda of h (x - a)^2 / 2 + penalty(x), per coordinate."""
    solution = []
    for a, h in zip(np.asarray(target, np.float64), np.asarray(curvature, np.float64)):
        result = optimize.minimize_scalar(
            lambda x, a=a, h=h: 0.5 * h * (x - a) ** 2 + objective(x),
            bounds=(-1 / LAM, 1 / LAM), method='bounded', options={'xatol': 1e-10})
        solution.append(result.x)
    return np.asarray(solution)


def _ridge(x):
    return 0.5 * LAM * x**2


def _entropy_barrier(x, beta=2.0):
    y = LAM * x
    return ((1 + y) / 2 * np.log1p(y) + (1 - y) / 2 * np.log1p(-y)) / (LAM * beta)


@pytest.mark.parametrize('kappa,penalty', [('clip', _ridge),
                                           (lion_optax.tanh_kappa(2.0), _entropy_barrier)],
                         ids=['clip', 'tanh'])
def test_smooth_kappas_solve_their_documented_problem(kappa, penalty):
    """clip: min f + (lambda/2)||x||^2 in the box; tanh(beta): min f + the entropy
    barrier K*(lambda x)/lambda. The solutions come from scipy on the penalties
    exactly as documented in kappa.py, so this checks the conjugates too."""
    x0, target, curvature = _box_problem()
    solution = _solve_scalar(penalty, target['x'], curvature['x'])
    assert np.sum(np.abs(solution) > 1.5) >= 8  # the penalty's edge matters
    for final_lr, trajectory in zip(FINAL_LRS, _run(kappa, x0, target, curvature)):
        _check_entry(kappa, x0, trajectory, final_lr)
        np.testing.assert_array_less(np.abs(trajectory['x'][-1] - solution),
                                     _final_tolerance(final_lr, np.abs(solution)))


def _ball_problem():
    rng = np.random.default_rng(1)
    direction_u, direction_v = rng.normal(size=16), rng.normal(size=8)
    # 'u' is outside the l2 and l3 balls of radius 2, 'v' inside both.
    target = {'u': 5.0 * direction_u / np.linalg.norm(direction_u),
              'v': 1.0 * direction_v / np.linalg.norm(direction_v)}
    x0 = {'u': 5.0 * rng.normal(size=16), 'v': 5.0 * rng.normal(size=8)}
    as_tree = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)  # noqa: E731
    return as_tree(x0), as_tree(target), jax.tree.map(jnp.ones_like, as_tree(target))


def _project_lq(a, radius, q):
    """Euclidean projection of a onto ||x||_q <= radius, by scipy (independent of lion)."""
    if np.sum(np.abs(a) ** q) ** (1 / q) <= radius:
        return a
    result = optimize.minimize(
        lambda x: 0.5 * np.sum((x - a) ** 2), 0.1 * a, jac=lambda x: x - a, method='SLSQP',
        constraints=[{'type': 'ineq', 'fun': lambda x: radius**q - np.sum(np.abs(x) ** q)}],
        options={'ftol': 1e-14, 'maxiter': 500})
    return result.x


@pytest.mark.parametrize('kappa', ['l2', 'l2_global', lion_optax.lp_kappa(1.5)],
                         ids=['l2', 'l2_global', 'lp1.5'])
def test_lp_kappas_converge_to_the_projection_onto_the_dual_ball(kappa):
    """f(x) = ||x - a||^2 / 2: Lion-K solves min f s.t. ||x||_q <= 1/lambda, whose
    solution is the Euclidean projection of a onto that ball: for l2 (q = 2)
    a * min(1, 1 / (lambda ||a||)), per array or over the whole tree; for
    p = 1.5 the l3 ball (q = 3), projected by scipy."""
    x0, target, curvature = _ball_problem()
    a = jax.tree.map(lambda v: np.asarray(v, np.float64), target)
    if kappa == 'l2':
        solution = {k: v * min(1.0, 1 / (LAM * np.linalg.norm(v))) for k, v in a.items()}
    elif kappa == 'l2_global':
        norm = np.sqrt(sum(np.sum(v**2) for v in a.values()))
        solution = {k: v * min(1.0, 1 / (LAM * norm)) for k, v in a.items()}
    else:
        solution = {k: _project_lq(v, 1 / LAM, 3.0) for k, v in a.items()}
    field = 'distance' if kappa == 'l2_global' else 'leaf_distance'
    for final_lr, trajectory in zip(FINAL_LRS, _run(kappa, x0, target, curvature)):
        _check_entry(kappa, x0, trajectory, final_lr, field=field)
        for k in ('u', 'v'):
            error = np.linalg.norm(trajectory[k][-1] - solution[k])
            assert error < _final_tolerance(final_lr, np.linalg.norm(solution[k])), (k, error)
