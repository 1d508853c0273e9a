"""Scaling laws: sweeps of model size x tokens, the Chinchilla-style fit L(N, D), compute-optimal allocation."""
