"""Shared test code: the equivalence harness (a tiny model trained a few steps on fixed batches, its losses,
gradient norms and parameters compared with a single device's), used by test_equivalence.py and by the tests
that hold other code paths (pipeline stages, kernels, attention) to the same numbers.

The tolerances below are explained in test_equivalence.py's docstring.
"""
import jax
import numpy as np

from jaxscale.config import Config, MeshConfig, OptimizerConfig, TrainConfig
from jaxscale.model import ModelConfig
from jaxscale.training import build_trainer

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4
STEPS = 3


def make_config(style: str, mesh: dict, microbatches: int = 1) -> Config:
    model = ModelConfig.from_preset("tiny" if style == "gpt2" else "tiny-llama", seq_len=32)
    return Config(
        model=model,
        mesh=MeshConfig(**{"data": 1, **mesh}),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
        train=TrainConfig(steps=STEPS, batch_size=16, microbatches=microbatches, compute_dtype="float32"),
    )


def batches(config: Config) -> list[dict[str, np.ndarray]]:
    """Random tokens, each row packed from a few documents (attention stays inside each: document masking)."""
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.model.seq_len + 1)
    return [{"tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
             "segment_ids": 1 + np.cumsum(rng.random(shape) < 0.05, axis=1, dtype=np.int32)}
            for _ in range(STEPS)]


def run(config: Config, devices) -> tuple[list[tuple[float, float]], dict]:
    """(loss, gradient norm) of each step, and the final parameters."""
    trainer = build_trainer(config, devices)
    state = trainer.init_state()
    losses = []
    for batch in batches(config):
        batch = jax.device_put(batch, trainer.data_sharding)
        state, metrics = trainer.train_step(state, batch)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return losses, jax.device_get(state.params)


_reference: dict = {}


def reference(style: str):
    if style not in _reference:
        _reference[style] = run(make_config(style, {}), jax.devices()[:1])
    return _reference[style]


def assert_same(result, expected):
    losses, params = result
    ref_losses, ref_params = expected
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), params, ref_params)
