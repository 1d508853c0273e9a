"""Fitting L(N, D) = E + A/N^alpha + B/D^beta to measured runs: Hoffmann et al. 2022's approach 3.

With a = log A, b = log B, e = log E, the fit minimises

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),     delta = 1e-3

with L-BFGS-B, started from the best points of a grid of initialisations, keeping the lowest minimum.
The objective is a sum (not a mean) and is divided by delta^2 before L-BFGS sees it: Besiroglu et al. 2024 found
that the original fit stopped early because its objective was too small for the optimiser's stopping tolerance.
Uncertainty comes from a bootstrap over runs; `holdout_largest` checks extrapolation to the largest-compute run.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from jaxscale.extras import require
from jaxscale.scaling.law import LossLaw

optimize = require("scipy.optimize", "scaling", "fitting a scaling law")
special = require("scipy.special", "scaling", "fitting a scaling law")

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}: 4500 points. Parameter order everywhere: (a, b, e, alpha, beta).
INIT_GRID = np.array(list(itertools.product(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5),
                                            np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))))
# L-BFGS runs from the best grid points by starting objective. On synthetic data the best 8 already reached the
# optimum that all 4500 starts reach, at about 1/1000 of the time; 16 leave a margin.
DEFAULT_STARTS = 16
EXPONENT_BOUNDS = (0.0, 3.0)  # a negative exponent would make loss grow with scale
# log E >= log 1e-3: below that E is indistinguishable from 0 in any loss of order 1, the objective is flat in e,
# and on data that prefer E = 0 L-BFGS would spend hundreds of iterations walking e towards -infinity.
LOG_E_BOUNDS = (float(np.log(1e-3)), None)
MIN_RUNS = 5  # five constants
# L is a function of N plus a function of D, so each part needs 3 distinct values to fix its 3 constants (E, A,
# alpha and E, B, beta); with fewer, the fit returns one of infinitely many equally good laws.
MIN_DISTINCT = 3


@dataclass(frozen=True)
class FitResult:
    law: LossLaw
    objective: float  # sum of Huber losses at the optimum (not divided by delta^2)
    n_runs: int


@dataclass(frozen=True)
class Interval:
    value: float  # the full-data fit
    std: float  # over bootstrap refits
    low: float  # percentile interval over bootstrap refits
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    constants: dict[str, Interval]  # E, A, B, alpha, beta, and a = beta / (alpha + beta)
    samples: np.ndarray  # (resamples, 5): E, A, B, alpha, beta of each refit
    confidence: float

    def laws(self) -> list[LossLaw]:
        return [LossLaw(*map(float, row)) for row in self.samples]

    def interval_of(self, values) -> tuple[float, float]:
        """Percentile interval, at this bootstrap's confidence, of a quantity computed for every refit."""
        return percentile_interval(values, self.confidence)


@dataclass(frozen=True)
class HoldoutResult:
    n: float
    d: float
    actual: float
    predicted: float
    fit: FitResult  # fitted without the held-out run

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.actual) / self.actual


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of the log-space residuals, and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)  # log-sum-exp of (t_n, t_d, e), written out: this is the hot loop
    x_n, x_d, x_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = x_n + x_d + x_e
    r = top + np.log(total) - log_l
    abs_r = np.abs(r)
    small = abs_r <= delta
    value = np.where(small, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum()
    dh = np.where(small, r, delta * np.sign(r)) / total  # d Huber / d r, times 1 / sum for the softmax weights
    g_n, g_d = dh * x_n, dh * x_d
    grad = np.array([g_n.sum(), g_d.sum(), (dh * x_e).sum(), -(g_n * log_n).sum(), -(g_d * log_d).sum()])
    return float(value), grad


def _grid_objectives(log_n, log_d, log_l, delta) -> np.ndarray:
    """The objective at every grid point at once (no gradient), to choose where L-BFGS starts."""
    g = INIT_GRID
    terms = np.stack([g[:, [0]] - g[:, [3]] * log_n, g[:, [1]] - g[:, [4]] * log_d,
                      np.broadcast_to(g[:, [2]], (len(g), len(log_n)))])
    r = special.logsumexp(terms, axis=0) - log_l
    return np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)


def fit_loss_law(n, d, loss, delta: float = HUBER_DELTA, starts: int | None = DEFAULT_STARTS,
                 extra_starts: list[np.ndarray] | None = None) -> FitResult:
    """Fit E, A, B, alpha, beta to runs with N parameters, D tokens and final loss L (1-D arrays).

    `starts`: how many of the best grid points L-BFGS starts from (None: all 4500). `extra_starts`: more starting
    points in (a, b, e, alpha, beta), e.g. a previous fit's optimum.
    """
    log_n, log_d, log_l = _logs(n, d, loss)
    order = np.argsort(_grid_objectives(log_n, log_d, log_l, delta))
    chosen = INIT_GRID[order[:starts] if starts else order]
    if extra_starts:
        chosen = np.vstack([chosen, *extra_starts])
    # L-BFGS works on centred logs: a - alpha log N = (a - alpha m) - alpha (log N - m). Uncentred, a and alpha
    # are almost collinear (log N ~ 20) and the optimiser crawls along that valley.
    m_n, m_d = log_n.mean(), log_d.mean()
    centred = chosen - np.outer(chosen[:, 3], [m_n, 0, 0, 0, 0]) - np.outer(chosen[:, 4], [0, m_d, 0, 0, 0])
    scale = 1.0 / delta ** 2  # keeps the objective O(1) or larger so the stopping tolerances bite at the right place

    def scaled(theta):
        value, grad = huber_objective(theta, log_n - m_n, log_d - m_d, log_l, delta)
        return value * scale, grad * scale

    bounds = [(None, None), (None, None), LOG_E_BOUNDS, EXPONENT_BOUNDS, EXPONENT_BOUNDS]
    best = None
    for x0 in centred:
        result = optimize.minimize(scaled, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-7})
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    a_c, b_c, e, alpha, beta = best.x
    a, b = a_c + alpha * m_n, b_c + beta * m_d
    law = LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))
    return FitResult(law=law, objective=float(best.fun / scale), n_runs=len(log_n))


def law_to_theta(law: LossLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap(n, d, loss, resamples: int = 200, seed: int = 0, confidence: float = 0.95,
              full_fit: FitResult | None = None, starts: int = 2) -> BootstrapResult:
    """Refit on runs resampled with replacement; std and percentile interval of each constant.

    Each refit starts from the full-data optimum, which a resample moves only a little, and from its own best
    `starts` grid points in case it moved to another basin.
    """
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    full_fit = full_fit or fit_loss_law(n, d, loss)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(idx)) < MIN_RUNS or _too_few_distinct(n[idx], d[idx]):
            continue  # too few distinct runs, sizes or budgets to determine five constants
        law = fit_loss_law(n[idx], d[idx], loss[idx], starts=starts,
                           extra_starts=[law_to_theta(full_fit.law)]).law
        samples.append([law.E, law.A, law.B, law.alpha, law.beta])
    if len(samples) < 2:
        raise ValueError(f"the bootstrap needs more runs: {len(n)} runs rarely resample to {MIN_RUNS} distinct ones")
    samples = np.array(samples)
    columns = {"E": samples[:, 0], "A": samples[:, 1], "B": samples[:, 2], "alpha": samples[:, 3],
               "beta": samples[:, 4], "a": samples[:, 4] / (samples[:, 3] + samples[:, 4])}
    full = full_fit.law
    values = {"E": full.E, "A": full.A, "B": full.B, "alpha": full.alpha, "beta": full.beta, "a": full.n_exponent}
    constants = {k: Interval(values[k], float(np.std(v, ddof=1)), *percentile_interval(v, confidence))
                 for k, v in columns.items()}
    return BootstrapResult(constants=constants, samples=samples, confidence=confidence)


def percentile_interval(values, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def holdout_largest(n, d, loss) -> HoldoutResult:
    """Fit without the run of largest compute 6 N D, then predict that run's loss."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if len(n) < MIN_RUNS + 1:
        raise ValueError(f"a holdout needs at least {MIN_RUNS + 1} runs, got {len(n)}")
    held = int(np.argmax(n * d))
    keep = np.arange(len(n)) != held
    fit = fit_loss_law(n[keep], d[keep], loss[keep])
    return HoldoutResult(n=float(n[held]), d=float(d[held]), actual=float(loss[held]),
                         predicted=float(fit.law.loss(n[held], d[held])), fit=fit)


def _logs(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape and n.ndim == 1):
        raise ValueError(f"N, D and loss must be 1-D arrays of one length, got shapes {n.shape}, {d.shape}, "
                         f"{loss.shape}")
    if len(n) < MIN_RUNS:
        raise ValueError(f"fitting five constants needs at least {MIN_RUNS} runs, got {len(n)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0) or not np.all(np.isfinite([n, d, loss])):
        raise ValueError("N, D and loss must be positive and finite")
    problem = _too_few_distinct(n, d)
    if problem:
        raise ValueError(problem)
    return np.log(n), np.log(d), np.log(loss)


def _too_few_distinct(n: np.ndarray, d: np.ndarray) -> str | None:
    """Why the runs cannot determine the law (see MIN_DISTINCT), or None."""
    sizes, budgets = len(np.unique(n)), len(np.unique(d))
    if sizes < MIN_DISTINCT or budgets < MIN_DISTINCT:
        return (f"the runs have {sizes} model size(s) N and {budgets} token count(s) D; the fit needs at least "
                f"{MIN_DISTINCT} of each (e.g. scaling sweep --sizes 32x1,64x2,96x3 --tokens 2.5e5,5e5,1e6)")
    return None
