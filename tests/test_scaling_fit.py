"""The approach-3 fit: its gradient, recovery of known constants from synthetic runs, bootstrap and holdout."""
import numpy as np
import pytest
from scipy.special import logsumexp

from jaxscale.scaling.fit import bootstrap, fit_loss_law, holdout_largest, huber_objective
from jaxscale.scaling.law import BESIROGLU_2024, HOFFMANN_2022, LossLaw


def synthetic_runs(law: LossLaw, noise: float, seed: int = 0):
    """A 5 x 5 grid of N in 1e7..1e10 and D in 1e9..1e12, loss x exp(normal(0, noise))."""
    n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 10, 5), np.logspace(9, 12, 5)))
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))
    return n, d, loss


def test_gradient_matches_finite_differences():
    n, d, loss = synthetic_runs(BESIROGLU_2024, noise=0.01)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta = np.array([6.0, 7.5, 0.6, 0.33, 0.38])
    a, b, e, alpha, beta = theta
    residuals = np.abs(logsumexp([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=0) - log_l)
    assert (residuals < 0.01).any() and (residuals > 0.01).any()  # both Huber branches are exercised
    _, grad = huber_objective(theta, log_n, log_d, log_l, delta=0.01)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        numeric = (huber_objective(theta + step, log_n, log_d, log_l, delta=0.01)[0]
                   - huber_objective(theta - step, log_n, log_d, log_l, delta=0.01)[0]) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("law", [BESIROGLU_2024, HOFFMANN_2022], ids=["besiroglu", "hoffmann"])
def test_fit_recovers_exact_constants_from_noise_free_runs(law):
    fit = fit_loss_law(*synthetic_runs(law, noise=0.0))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(law, name), rel=1e-3), name
    assert fit.objective < 1e-9


def test_fit_recovers_constants_from_noisy_runs():
    """0.2% multiplicative noise, seed 0: exponents within 0.02, E within 1%, compute-optimal N at 1e24 FLOPs
    within 30% (A and B trade off against the exponents, so they are looser: within 40%)."""
    true = BESIROGLU_2024
    fit = fit_loss_law(*synthetic_runs(true, noise=0.002)).law
    assert fit.alpha == pytest.approx(true.alpha, abs=0.02)
    assert fit.beta == pytest.approx(true.beta, abs=0.02)
    assert fit.E == pytest.approx(true.E, rel=0.01)
    assert fit.A == pytest.approx(true.A, rel=0.4)
    assert fit.B == pytest.approx(true.B, rel=0.4)
    assert fit.compute_optimal(1e24)[0] == pytest.approx(true.compute_optimal(1e24)[0], rel=0.3)


def test_bootstrap_intervals_cover_the_fit_and_the_truth():
    n, d, loss = synthetic_runs(BESIROGLU_2024, noise=0.002)
    result = bootstrap(n, d, loss, resamples=12, seed=1)
    assert result.samples.shape == (12, 5)
    for name in ("E", "alpha", "beta", "a"):
        interval = result.constants[name]
        assert interval.std > 0
        assert interval.low <= interval.value <= interval.high, name
        truth = BESIROGLU_2024.n_exponent if name == "a" else getattr(BESIROGLU_2024, name)
        assert interval.low - 3 * interval.std <= truth <= interval.high + 3 * interval.std, name


def test_holdout_predicts_the_largest_compute_run():
    n, d, loss = synthetic_runs(HOFFMANN_2022, noise=0.002)
    result = holdout_largest(n, d, loss)
    assert (result.n, result.d) == (1e10, 1e12)  # the largest 6ND of the grid
    assert result.fit.n_runs == len(n) - 1
    assert abs(result.relative_error) < 0.01
    assert result.relative_error == pytest.approx((result.predicted - result.actual) / result.actual)


def test_fit_refuses_too_few_or_bad_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_loss_law([1e6, 2e6, 4e6], [1e8, 1e8, 1e8], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="positive and finite"):
        fit_loss_law([1e6] * 5, [1e8] * 5, [3.0, 2.9, -1, 2.7, 2.6])


def test_fit_refuses_runs_that_cannot_determine_the_law():
    # One model size: E + A/N^alpha is a single number, so E, A and alpha are any of infinitely many
    d = np.logspace(8, 10, 6)
    with pytest.raises(ValueError, match=r"1 model size\(s\) N and 6 token count\(s\) D; the fit needs at least 3"):
        fit_loss_law(np.full(6, 1e7), d, HOFFMANN_2022.loss(1e7, d))
    n, d = (x.ravel() for x in np.meshgrid([1e7, 1e8], np.logspace(8, 10, 4)))
    with pytest.raises(ValueError, match="2 model size"):
        fit_loss_law(n, d, HOFFMANN_2022.loss(n, d))


def test_bootstrap_skips_resamples_that_cannot_determine_the_law():
    n, d = (x.ravel() for x in np.meshgrid(np.logspace(7, 9, 3), np.logspace(9, 11, 3)))  # the smallest grid
    loss = HOFFMANN_2022.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.002, n.shape))
    result = bootstrap(n, d, loss, resamples=40, seed=0)
    assert 2 <= len(result.samples) < 40  # the resamples with fewer than 3 sizes or token counts are left out
