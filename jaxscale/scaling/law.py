"""The parametric loss law L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal allocation.

N is the number of parameters and D the number of training tokens; training compute is taken as C = 6 N D.
Minimising L subject to C = 6 N D has a closed form (Hoffmann et al. 2022, section 3.3):

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt(C) = G (C/6)^(beta / (alpha + beta)),    D_opt(C) = G^-1 (C/6)^(alpha / (alpha + beta))
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """Predicted loss at N parameters and D tokens (numbers or arrays)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, compute):
        """(N_opt, D_opt) minimising the loss at training compute C = 6 N D (numbers or arrays)."""
        c6 = np.asarray(compute, dtype=float) / 6.0
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * c6 ** (self.beta / s), c6 ** (self.alpha / s) / g

    @property
    def n_exponent(self) -> float:
        """a in N_opt ∝ C^a; D_opt ∝ C^(1 - a)."""
        return self.beta / (self.alpha + self.beta)


# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3, as printed in the paper
# body text. The LaTeX source carries more digits; Besiroglu et al. 2024 show the rounding of alpha and beta
# moves the implied allocation noticeably (see HOFFMANN_2022_UNROUNDED).
HOFFMANN_2022 = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# The same fit with the digits of the paper's LaTeX source (quoted by Besiroglu et al. 2024).
HOFFMANN_2022_UNROUNDED = LossLaw(E=1.6934, A=406.4, B=410.7, alpha=0.3392, beta=0.2849)
# Besiroglu, Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102):
# approach 3 refitted to data reconstructed from Hoffmann et al.'s figures.
BESIROGLU_2024 = LossLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
