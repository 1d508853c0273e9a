"""The trainer, in the order it happens: mesh -> data -> model -> shard -> step -> loop."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxscale.checkpointing import CheckpointError, CheckpointStore, Restored, RunInfo
from jaxscale.checkpointing.schedule import SaveSchedule
from jaxscale.config import Config, resolve_mesh_sizes, save_config, validate
from jaxscale.cost.catalog import accelerator_for_device_kind
from jaxscale.cost.energy import run_summary
from jaxscale.data import Dataset, Prefetcher, build_dataset, check_vocab
from jaxscale.errors import ConfigError
from jaxscale.mesh import build_mesh, describe
from jaxscale.model import Model
from jaxscale.parallel import describe_plan, plan_from_config
from jaxscale.platforms import devices_platform
from jaxscale.training.elastic import adapt_to_devices, fit_mesh, per_device_batch
from jaxscale.training.events import log_event
from jaxscale.training.guards import GuardEvent, GuardMonitor, guard_updates
from jaxscale.training.metrics import MetricsLogger
from jaxscale.training.optimizer import build_optimizer
from jaxscale.training.preemption import EXIT_PREEMPTED, PreemptionWatcher
from jaxscale.training.step import (
    TrainState,
    batch_sharding,
    init_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

log = logging.getLogger("jaxscale")


@dataclass
class TrainResult:
    state: TrainState
    metrics: list[dict]  # the training and evaluation rows written to metrics.jsonl
    config: Config
    events: list[dict] = field(default_factory=list)  # the event rows written to metrics.jsonl (start, ...)
    preempted: bool = False  # stopped early by SIGTERM / SIGINT after saving; rerun the command to continue
    summary: dict = field(default_factory=dict)  # tokens, time, energy, cost (also <run_dir>/summary.json)


def compute_dtype_for(config: Config, platform: str):
    """`platform`: that of the devices the step is compiled for (not the host's default backend)."""
    name = config.train.compute_dtype
    if name == "auto":
        name = "float32" if platform == "cpu" else "bfloat16"
    return jnp.dtype(name)


def open_dataset(config: Config) -> Dataset:
    """The run's data (tokenized once into the cache), checked against the model's vocabulary."""
    dataset = build_dataset(config.data, config.model.seq_len)
    check_vocab(dataset, config.model.vocab_size)
    return dataset


def batch_shard(sharding: NamedSharding, batch_size: int) -> dict[str, int]:
    """Which rows of each global batch this process reads, as `Dataset.batch` / `Prefetcher` keyword arguments:
    the block of rows its devices hold. Processes whose devices hold the same rows (a tensor or pipeline axis
    that spans processes) read the same block."""
    held = sorted({(rows.start or 0, batch_size if rows.stop is None else rows.stop)
                   for rows, _ in sharding.addressable_devices_indices_map((batch_size, 1)).values()})
    start, stop, gap = held[0][0], held[0][1], False
    for first, end in held[1:]:
        gap |= first > stop
        stop = max(stop, end)
    size = stop - start
    if gap or batch_size % size or start % size:
        raise ConfigError(f"this process's devices hold rows {held} of the batch of {batch_size}, not one block of "
                          f"a whole number of equal blocks; give each process adjacent positions on the batch "
                          f"axes (mesh.data / mesh.fsdp) or make train.batch_size a multiple of {size}")
    return dict(shard_index=start // size, shard_count=batch_size // size)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in batch.items()}


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

    def abstract_state(self) -> TrainState:
        """Shape, dtype and sharding of every array of the state, without computing any: the target that a
        checkpoint restores into, each device reading only its own pieces."""
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.model.shapes,
                            opt_state=jax.eval_shape(self.tx.init, self.model.shapes))
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, self.shardings)


def build_trainer(config: Config, devices: list | None = None) -> Trainer:
    """Mesh -> model -> optimizer -> shardings -> compiled steps. Checks the config before anything compiles."""
    devices = devices if devices is not None else jax.devices()
    validate(config, len(devices))
    mesh = build_mesh(config.mesh, devices)
    t = config.train
    model = Model.build(config.model, jnp.dtype(t.param_dtype))
    tx, schedule = build_optimizer(config.optimizer, t.steps, model.shapes)
    tx = guard_updates(tx, config.guards)
    shardings = state_shardings(model, tx, mesh, config.sharding.params)
    compute_dtype = compute_dtype_for(config, devices_platform(mesh.devices))
    return Trainer(config, mesh, model, tx, schedule, shardings,
                   data_sharding=batch_sharding(mesh, config.sharding.activations),
                   train_step=make_train_step(model, tx, schedule, config, mesh, shardings, compute_dtype),
                   eval_step=make_eval_step(model, config, mesh, shardings, compute_dtype))


def checkpoint_dir(config: Config) -> Path:
    return Path(config.checkpoint.dir) if config.checkpoint.dir else config.resolved_run_dir() / "checkpoints"


def open_checkpoints(config: Config) -> CheckpointStore:
    """The run's checkpoints. Starting over (checkpoint.resume=false) where a run already saved some deletes
    them only if checkpoint.overwrite=true says so."""
    store = CheckpointStore(checkpoint_dir(config), config.checkpoint)
    steps = store.steps()
    if not config.checkpoint.resume and steps:
        if not config.checkpoint.overwrite:
            store.close()
            raise CheckpointError(
                f"checkpoint.resume=false, but {store.directory} already holds the checkpoints of a run "
                f"(steps {', '.join(map(str, steps))}). To continue that run, drop checkpoint.resume=false; "
                f"to delete them and start over, add --set checkpoint.overwrite=true; or choose another "
                f"run_dir")
        log.warning("checkpoint.overwrite=true: deleting the checkpoints at steps %s in %s", steps,
                    store.directory)
        store.delete_all()
    return store


def run_info(config: Config, skipped_batches: set[int]) -> RunInfo:
    sizes = resolve_mesh_sizes(config.mesh, jax.device_count())
    return RunInfo(seed=config.train.seed, mesh=sizes, microbatches=config.train.microbatches,
                   per_device_batch=per_device_batch(config, sizes), process_count=jax.process_count(),
                   skipped_batches=sorted(skipped_batches), config=config.to_dict())


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for each config value that differs from the one the checkpoint was written with."""
    changes = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


class TrainingDiverged(RuntimeError):
    """Bad updates keep coming back after rollbacks; the message says what to try."""


@dataclass
class Rollbacks:
    """The batches that rollbacks took out of the data stream, and how often each checkpoint was rolled
    back to: a run that keeps failing after the same checkpoint is stopped, not looped."""

    limit: int
    skipped_batches: set[int] = field(default_factory=set)
    count: Counter = field(default_factory=Counter)

    def record(self, event: GuardEvent, to_step: int) -> None:
        self.count[to_step] += 1
        if self.count[to_step] > self.limit:
            raise TrainingDiverged(
                f"{event.reason} at step {event.step} after {self.limit} rollbacks to step {to_step}: the "
                f"bad updates do not come from single batches. Lower optimizer.learning_rate, raise "
                f"guards.spike_factor, or raise guards.max_rollbacks to skip more batches")
        self.skipped_batches.add(event.step - 1)  # the batch index of the update numbered event.step


def evaluate(trainer: Trainer, dataset, state: TrainState, shard: dict) -> float:
    t = trainer.config.train
    losses = [trainer.eval_step(state.params, to_global(
        dataset.batch(i, t.batch_size, split="validation", **shard), trainer.data_sharding, t.batch_size))
        for i in range(t.eval_batches)]
    return float(np.mean(jax.device_get(losses)))


def log_skipped_update(logger: MetricsLogger, event: GuardEvent) -> None:
    # The values are nested so that readers picking rows by their "loss" key see only training rows.
    log_event(logger, event.step, "update_skipped",
              f"update skipped: {event.reason} (loss {event.loss:.4g}, gradient norm {event.grad_norm:.4g})",
              logging.WARNING, reason=event.reason, values={"loss": event.loss, "grad_norm": event.grad_norm})


def train(config: Config) -> TrainResult:
    """Train to config.train.steps, continuing from the newest good checkpoint of the run unless
    checkpoint.resume=false. SIGTERM / SIGINT: finish the step, save, and return with `preempted` set."""
    with PreemptionWatcher() as watcher:
        # A config or data that cannot run fails here, before anything is written to the run's directory.
        if config.train.elastic:  # the microbatches are chosen later, from the checkpoint's per-device batch
            fitted = dataclasses.replace(config, mesh=fit_mesh(config.mesh, jax.device_count()),
                                         train=dataclasses.replace(config.train, microbatches=1))
            validate(fitted, jax.device_count())
        else:
            validate(config, jax.device_count())
        dataset = open_dataset(config)
        if config.train.eval_every and not dataset.has_split("validation"):
            raise ConfigError(f"train.eval_every={config.train.eval_every} evaluates on validation data, but "
                              f"the data has none: set data.validation_fraction > 0 or data.validation_source, "
                              f"or turn evaluation off with train.eval_every=0")
        store = open_checkpoints(config)
        try:
            return train_with(config, dataset, store, watcher)
        finally:
            store.close()


def train_with(config: Config, dataset: Dataset, store: CheckpointStore, watcher: PreemptionWatcher) -> TrainResult:
    resume = config.checkpoint.resume
    newest = store.newest_metadata() if resume else None
    elastic_note = None
    if config.train.elastic:
        config, elastic_note = adapt_to_devices(config, jax.device_count(),
                                                newest.per_device_batch if newest else None)
    trainer = build_trainer(config)
    t = config.train
    run_dir = config.resolved_run_dir()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    log.info("mesh %s; model %s with %.1fM parameters", describe(trainer.mesh), config.model.style,
             trainer.model.param_count() / 1e6)
    log.info("data:\n%s", dataset.summary())
    if elastic_note:
        log.info(elastic_note)
    if trainer.mesh.shape["pipeline"] > 1:
        log.info("%s", describe_plan(plan_from_config(config.pipeline, config.model.n_layers,
                                                      trainer.mesh.shape["pipeline"])))

    restored: Restored | None = store.restore_newest(trainer.abstract_state()) if resume else None
    state = restored.state if restored else trainer.init_state()
    step = restored.metadata.step if restored else 0
    rollbacks = Rollbacks(config.guards.max_rollbacks,
                          set(restored.metadata.skipped_batches) if restored else set())

    # Data: a pure function of the step; each process reads only the rows of the global batch its devices hold.
    shard = batch_shard(trainer.data_sharding, t.batch_size)
    history: list[dict] = []  # the rows written to metrics.jsonl, across rollbacks

    session_started = time.perf_counter()

    def open_logger(start_step: int, tokens_before: int = 0) -> MetricsLogger:
        return MetricsLogger(run_dir, total_steps=t.steps, start_step=start_step, log_every=t.log_every,
                             tokens_per_step=t.batch_size * config.model.seq_len,
                             flops_per_token=config.model.flops_per_token(), n_devices=jax.device_count(),
                             show_progress=t.progress, is_main_process=jax.process_index() == 0,
                             started=session_started, tokens_before=tokens_before)

    def close_logger(logger: MetricsLogger) -> None:
        logger.close()
        history.extend(logger.history)

    logger = open_logger(step)
    if restored:
        for change in config_changes(restored.metadata.config, config.to_dict()):
            log.info("changed since the checkpoint: %s", change)
        damaged = [str(path) for path in restored.damaged]
        moved = f" (newer damaged ones moved to {', '.join(damaged)})" if damaged else ""
        log_event(logger, step, "resume", f"resuming from checkpoint {restored.path}{moved}",
                  checkpoint=str(restored.path), damaged=damaged, elastic=elastic_note)
    else:
        log_event(logger, step, "start", f"starting from scratch; checkpoints go to {store.directory}")
    if step >= t.steps:
        log.info("the run is already complete (train.steps=%d); raise train.steps to train further", t.steps)

    # Advances the step without an update: for batches taken out by a rollback.
    skip_batch = jax.jit(lambda s: s.replace(step=s.step + 1), in_shardings=(trainer.shardings,),
                         out_shardings=trainer.shardings, donate_argnums=0)
    monitor, schedule = GuardMonitor(), SaveSchedule(config.checkpoint)
    preempted = False
    while step < t.steps and not preempted:
        with Prefetcher(dataset, step, t.batch_size, depth=config.data.prefetch, **shard) as batches:
            for position, batch, wait_s in batches:  # position: the batch index = the steps done so far
                events = []
                if position in rollbacks.skipped_batches:
                    state = skip_batch(state)
                    log_event(logger, position + 1, "batch_skipped",
                              f"skipping batch {position} (a rollback took it out)", batch=position)
                else:
                    state, metrics = trainer.train_step(state, to_global(batch, trainer.data_sharding, t.batch_size))
                    logger.push(position, metrics, wait_s)
                    events.append(monitor.push(position, metrics))
                step = position + 1
                stop = watcher.should_stop(step)
                save = schedule.due(step) or stop or step == t.steps
                evaluate_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
                if save or evaluate_now:  # what is saved or evaluated must have passed its guard
                    events.append(monitor.flush())
                events = [e for e in events if e is not None]
                for event in events:
                    log_skipped_update(logger, event)
                if events and config.guards.on_nonfinite == "rollback":
                    store.wait()  # a save in flight is the newest good state
                    back = store.restore_newest(trainer.abstract_state())
                    step = back.metadata.step if back else 0
                    rollbacks.record(events[0], step)
                    state = back.state if back else trainer.init_state()
                    monitor = GuardMonitor()
                    close_logger(logger)
                    logger = open_logger(step, logger.tokens_trained)  # the session's totals go on
                    log_event(logger, step, "rollback",
                              f"rolled back to step {step} ({back.path if back else 'the initial state'}); "
                              f"batch {events[0].step - 1} will be skipped", logging.WARNING,
                              from_step=events[0].step, reason=events[0].reason,
                              skipped_batch=events[0].step - 1)
                    break
                if evaluate_now:
                    logger.flush()
                    logger.write({"step": step, "eval_loss": evaluate(trainer, dataset, state, shard)})
                if save:
                    store.save(step, state, run_info(config, rollbacks.skipped_batches))
                    schedule.saved()
                    log_event(logger, step, "checkpoint", f"saving checkpoint {store.path(step)}",
                              path=str(store.path(step)))
                if stop and step < t.steps:  # at the last step the run is simply complete
                    store.wait()
                    log_event(logger, step, "preempted",
                              f"preemption notice: checkpoint {store.path(step)} is saved; exiting with code "
                              f"{EXIT_PREEMPTED}. Rerun the same command to continue", logging.WARNING,
                              exit_code=EXIT_PREEMPTED)
                    preempted = True
                    break
                if step >= t.steps:
                    break
    store.wait()
    close_logger(logger)
    rows = [row for row in history if "event" not in row]
    summary = write_run_summary(rows, run_dir)
    return TrainResult(state, rows, config, [row for row in history if "event" in row], preempted, summary)


def write_run_summary(rows: list[dict], run_dir: Path) -> dict:
    """Tokens, time, measured energy and the cost at the catalog's price for this session of the run. A session
    that trained nothing (the run was already complete) leaves the previous session's summary.json as it is."""
    accelerator = accelerator_for_device_kind(jax.devices()[0].device_kind)
    trained = [r for r in rows if "loss" in r]
    summary = run_summary(trained, accelerator, chips=jax.device_count())
    if not trained:
        return summary
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    known = {k: v for k, v in summary.items() if v is not None}
    log.info("run summary: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in known.items()))
    return summary
