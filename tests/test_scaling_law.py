"""The closed-form compute-optimal allocation against the published figures.

Figures reproduced (C = 6ND, Gopher's and Chinchilla's budget C = 5.76e23 FLOPs as in Hoffmann et al. 2022):

* Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3: exponent
  a = beta / (alpha + beta) = 0.46 (their table of the three approaches' exponents) and a compute-optimal model
  of about 40B parameters at Gopher's budget (their approach-3 projection, beside 67B from approach 1 and 63B
  from approach 2). Both need the constants of the paper's LaTeX source (alpha 0.3392, beta 0.2849, E 1.6934):
  with the rounded constants of the paper's text (alpha 0.34, beta 0.28) a is 0.452 and N_opt 32B, the
  rounding bias Besiroglu et al. 2024 point out. Tolerance: a within 0.005, N_opt within 5% of 40B.
* Approach-3 constants imply far more than Chinchilla's 20 tokens per parameter: ~59 (unrounded) or ~93 (rounded)
  at 5.76e23 FLOPs, rising with compute because alpha > beta. Besiroglu et al. 2024 (arXiv:2404.10102, Fig. 1)
  show these estimates are inconsistent with the 70B-parameter, 1.4T-token (20 tokens/parameter) Chinchilla run.
  Checked: above 50 and rising from 1e21 to 1e26 FLOPs.
* Besiroglu et al. 2024's refit (E 1.8172, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658): a = 0.5126 as they
  report (within 0.0005), and at Chinchilla's budget N_opt = 72B and 18 tokens per parameter: Chinchilla's
  70B / 20 within 10% and 25%, and between 15 and 25 tokens per parameter from 1e21 to 1e25 FLOPs.
"""
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from jaxscale.scaling.law import BESIROGLU_2024, HOFFMANN_2022, HOFFMANN_2022_UNROUNDED, LossLaw

GOPHER_BUDGET = 5.76e23  # FLOPs; Chinchilla was trained with the same budget


def tokens_per_parameter(law: LossLaw, compute: float) -> float:
    n, d = law.compute_optimal(compute)
    return float(d / n)


def test_closed_form_matches_numerical_minimisation_on_the_budget_line():
    for law in (HOFFMANN_2022, HOFFMANN_2022_UNROUNDED, BESIROGLU_2024):
        for compute in (1e19, GOPHER_BUDGET, 1e26):
            n_opt, d_opt = law.compute_optimal(compute)
            assert 6 * n_opt * d_opt == pytest.approx(compute)
            def loss_on_budget(log_n, law=law, compute=compute):
                return float(law.loss(np.exp(log_n), compute / (6 * np.exp(log_n))))

            best = minimize_scalar(loss_on_budget,
                                   bounds=(np.log(1e3), np.log(compute / 6 / 1e3)), method="bounded",
                                   options={"xatol": 1e-10})
            assert np.exp(best.x) == pytest.approx(n_opt, rel=1e-4)


def test_hoffmann_approach3_exponent_and_gopher_budget_model_size():
    assert HOFFMANN_2022_UNROUNDED.n_exponent == pytest.approx(0.46, abs=0.005)
    n_opt, _ = HOFFMANN_2022_UNROUNDED.compute_optimal(GOPHER_BUDGET)
    assert n_opt == pytest.approx(40e9, rel=0.05)
    # The rounded constants of the paper's text: a = 0.452 and a 20% smaller model.
    assert HOFFMANN_2022.n_exponent == pytest.approx(0.4516, abs=0.0001)
    rounded_n, _ = HOFFMANN_2022.compute_optimal(GOPHER_BUDGET)
    assert 0.75 < rounded_n / n_opt < 0.85


def test_hoffmann_approach3_tokens_per_parameter_far_above_chinchilla_and_rising():
    for law in (HOFFMANN_2022, HOFFMANN_2022_UNROUNDED):
        ratios = [tokens_per_parameter(law, c) for c in (1e21, GOPHER_BUDGET, 1e26)]
        assert ratios[1] > 50  # Chinchilla itself used 20
        assert ratios[0] < ratios[1] < ratios[2]
    assert tokens_per_parameter(HOFFMANN_2022_UNROUNDED, GOPHER_BUDGET) == pytest.approx(59, rel=0.02)
    assert tokens_per_parameter(HOFFMANN_2022, GOPHER_BUDGET) == pytest.approx(93, rel=0.02)


def test_besiroglu_refit_reproduces_about_20_tokens_per_parameter():
    assert BESIROGLU_2024.n_exponent == pytest.approx(0.5126, abs=0.0005)
    n_opt, d_opt = BESIROGLU_2024.compute_optimal(GOPHER_BUDGET)
    assert n_opt == pytest.approx(70e9, rel=0.10)  # Chinchilla: 70B parameters
    assert d_opt == pytest.approx(1.4e12, rel=0.10)  # on 1.4T tokens
    assert d_opt / n_opt == pytest.approx(20, rel=0.25)
    for compute in (1e21, 1e22, 1e23, 1e24, 1e25):
        assert 15 < tokens_per_parameter(BESIROGLU_2024, compute) < 25
