"""The trainer, in the order it happens: mesh -> data -> model -> shard -> step -> loop."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxscale.config import Config, save_config, validate
from jaxscale.data import Prefetcher, build_dataset, check_vocab
from jaxscale.mesh import build_mesh, describe
from jaxscale.model import Model
from jaxscale.training.metrics import MetricsLogger
from jaxscale.training.optimizer import build_optimizer
from jaxscale.training.step import (TrainState, batch_sharding, init_state, make_eval_step, make_train_step,
                                 state_shardings)

log = logging.getLogger("jaxscale")


@dataclass
class TrainResult:
    state: TrainState
    metrics: list[dict]  # the rows written to metrics.jsonl
    config: Config


def compute_dtype_for(config: Config):
    name = config.train.compute_dtype
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


@dataclass
class Trainer:
    """Everything a training loop needs, built from a config. Researchers writing their own loop start here."""

    config: Config
    mesh: Mesh
    model: Model
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    data_sharding: NamedSharding
    train_step: Callable  # (state, global batch) -> (state, metrics)
    eval_step: Callable  # (params, global batch) -> loss

    def init_state(self) -> TrainState:
        return init_state(self.model, self.tx, self.shardings, self.config.train.seed)


def build_trainer(config: Config, devices: list | None = None) -> Trainer:
    """Mesh -> model -> optimizer -> shardings -> compiled steps. Checks the config before anything compiles."""
    devices = devices if devices is not None else jax.devices()
    validate(config, len(devices))
    mesh = build_mesh(config.mesh, devices)
    t = config.train
    model = Model.build(config.model, jnp.dtype(t.param_dtype))
    tx, schedule = build_optimizer(config.optimizer, t.steps, model.shapes)
    shardings = state_shardings(model, tx, mesh, config.sharding.params)
    compute_dtype = compute_dtype_for(config)
    return Trainer(config, mesh, model, tx, schedule, shardings,
                   data_sharding=batch_sharding(mesh, config.sharding.activations),
                   train_step=make_train_step(model, tx, schedule, config, mesh, shardings, compute_dtype),
                   eval_step=make_eval_step(model, config, mesh, shardings, compute_dtype))


def train(config: Config) -> TrainResult:
    trainer = build_trainer(config)
    t = config.train
    run_dir = config.resolved_run_dir()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    log.info("mesh %s; model %s with %.1fM parameters", describe(trainer.mesh), config.model.style,
             trainer.model.param_count() / 1e6)

    # Data: a pure function of the step; each process reads only its own rows of the global batch.
    dataset = build_dataset(config.data, config.model.seq_len)
    check_vocab(dataset, config.model.vocab_size)
    rank = dict(process_index=jax.process_index(), process_count=jax.process_count())

    state = trainer.init_state()
    start = int(state.step)
    logger = MetricsLogger(run_dir, total_steps=t.steps, start_step=start, log_every=t.log_every,
                           tokens_per_step=t.batch_size * config.model.seq_len,
                           flops_per_token=config.model.flops_per_token(), n_devices=jax.device_count(),
                           show_progress=t.progress, is_main_process=jax.process_index() == 0)
    with Prefetcher(dataset, start, t.batch_size, depth=config.data.prefetch, **rank) as batches:
        for step, batch, wait_s in batches:
            if step >= t.steps:
                break
            state, metrics = trainer.train_step(state, to_global(batch, trainer.data_sharding))
            logger.push(step, metrics, wait_s)
            if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                losses = [trainer.eval_step(state.params, to_global(
                    dataset.batch(i, t.batch_size, split="validation", **rank), trainer.data_sharding))
                    for i in range(t.eval_batches)]
                logger.flush()
                logger.write({"step": step + 1, "eval_loss": float(np.mean(jax.device_get(losses)))})
    logger.close()
    return TrainResult(state, logger.history, config)
