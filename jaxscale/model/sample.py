"""Sampling text from the built-in decoder, one token at a time, plainly.

No KV cache: every step runs the whole model on the last `seq_len` tokens. The window is padded on the right
to `seq_len`, so the step compiles once; attention is causal, so the padding never changes the logits at the
last real position, which are the ones read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.model import Model


def generate(model: Model, params: dict, prompt_tokens: np.ndarray, steps: int, *, temperature: float = 0.8,
             key: jax.Array) -> np.ndarray:
    """`steps` new token ids (int32) following `prompt_tokens` (1-D ints), drawn from the model's softmax over
    the real vocabulary (`cfg.vocab_size`, not the padded one) at `temperature`; 0 takes the most likely token.
    The same `key` gives the same tokens."""
    cfg = model.cfg
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be a non-empty 1-D array of token ids, got shape {prompt.shape} "
                         f"and dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(f"prompt_tokens hold ids outside [0, {cfg.vocab_size}), the model's vocabulary")
    if steps < 0 or temperature < 0:
        raise ValueError(f"steps and temperature must be >= 0, got {steps} and {temperature}")

    @jax.jit
    def next_token(params, window, length, key):
        logits = model.apply(params, window[None])[0, length - 1, :cfg.vocab_size].astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    tokens = list(prompt.astype(np.int32))
    window = np.zeros(cfg.seq_len, np.int32)
    for i in range(steps):
        recent = tokens[-cfg.seq_len:]
        window[:len(recent)] = recent
        window[len(recent):] = 0
        tokens.append(int(next_token(params, window, len(recent), jax.random.fold_in(key, i))))
    return np.asarray(tokens[len(prompt):], dtype=np.int32)
