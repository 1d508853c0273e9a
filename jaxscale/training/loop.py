"""The training run, in the order it happens: plan -> data -> build -> restore -> loop -> finish.

Every check (config, devices, data, sharding rules, the checkpoint to resume) runs before anything in the run
directory changes.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from jaxscale.checkpointing import CheckpointStore, Restored
from jaxscale.checkpointing.schedule import SaveSchedule
from jaxscale.config import Config, save_config
from jaxscale.cost.catalog import accelerator_for_device_kind
from jaxscale.cost.energy import run_summary
from jaxscale.data import Dataset, Prefetcher, build_dataset, check_vocab
from jaxscale.data.records import RecordData
from jaxscale.distributed import PeerWatchdog
from jaxscale.errors import ConfigError
from jaxscale.mesh import describe
from jaxscale.model import LOSS_WEIGHT, FlaxModel, LossFn
from jaxscale.model.run_source import RUN_PREFIX
from jaxscale.observe import goodput, stragglers
from jaxscale.observe.goodput import GoodputClock
from jaxscale.observe.profile import StepProfiler
from jaxscale.observe.stragglers import StragglerMonitor
from jaxscale.observe.trackers import Trackers
from jaxscale.parallel import describe_plan, plan_from_config
from jaxscale.planner.plan import nearest_fitting
from jaxscale.planner.rates import rates_for
from jaxscale.training.batches import batch_shard, to_global
from jaxscale.training.events import log_event, read_metrics
from jaxscale.training.guards import GuardEvent, GuardMonitor
from jaxscale.training.language_model import lm_batch_spec
from jaxscale.training.memory_check import check_step_memory, step_memory
from jaxscale.training.metrics import MetricsLogger
from jaxscale.training.posttrain import open_posttrain_data
from jaxscale.training.preemption import EXIT_PREEMPTED, PreemptionWatcher
from jaxscale.training.reference import attach_reference
from jaxscale.training.run_init import check_run_params
from jaxscale.training.run_lock import RunLock
from jaxscale.training.step import TrainState, model_flops
from jaxscale.training.trainer import Trainer, build, checkpoint_dir, plan_run

log = logging.getLogger("jaxscale")


@dataclass
class TrainResult:
    state: TrainState
    metrics: list[dict]  # the training and evaluation rows written to metrics.jsonl
    config: Config
    events: list[dict] = field(default_factory=list)  # the event rows written to metrics.jsonl (start, ...)
    preempted: bool = False  # stopped early by SIGTERM / SIGINT after saving; rerun the command to continue
    summary: dict = field(default_factory=dict)  # tokens, time, energy, cost (also <run_dir>/summary.json)
    model: FlaxModel | None = field(default=None, repr=False)

    def trained_model(self):
        """The model with the final parameters, callable as model(inputs): an NNX module in eval mode, or the
        Linen module bound to them."""
        module = self.model.bind(self.state.params)
        if isinstance(module, nnx.Module):
            module.eval()
        return module


def open_dataset(config: Config) -> Dataset:
    """The run's text data (tokenized once into the cache), checked against the model's vocabulary."""
    dataset = build_dataset(config.data, config.model.seq_len)
    check_vocab(dataset, config.model.vocab_size)
    return dataset


def open_data(config: Config, data: Any, eval_data: Any, builtin_model: bool):
    """The user's examples (`data`, `eval_data`), or the configured text data."""
    if data is None:
        if eval_data is not None:
            raise ConfigError("eval_data is given without data; pass both, or neither to use the configured data")
        dataset = open_dataset(config)
    else:
        dataset = RecordData(data, eval_data, seed=config.train.seed)
    if config.train.eval_every and not dataset.has_split("validation"):
        fix = ("pass eval_data=" if data is not None else
               "set data.validation_fraction > 0 or data.validation_source")
        raise ConfigError(f"train.eval_every={config.train.eval_every} evaluates on held-out data, but there is "
                          f"none: {fix}, or turn evaluation off with train.eval_every=0")
    return dataset


def tokens_per_step(config: Config, example: dict | None) -> int:
    """Tokens a step trains on: batch x seq_len for text; for a user's batch with `tokens` (B, T + 1), B x T;
    otherwise the number of examples."""
    if example is None:
        return config.train.batch_size * config.model.seq_len
    tokens = example.get("tokens")
    if tokens is not None and len(tokens.shape) == 2:
        return tokens.shape[0] * (tokens.shape[1] - 1)
    if "chosen_tokens" in example:  # preference pairs: both sequences of each pair are run
        return 2 * example["chosen_tokens"].shape[0] * (example["chosen_tokens"].shape[1] - 1)
    return config.train.batch_size


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


EXIT_DIVERGED = 3  # `jaxscale train`'s exit code when bad updates keep coming (the newest checkpoint is kept)


class TrainingDiverged(RuntimeError):
    """Bad updates keep coming back (in a row, or after rollbacks); the message says what to try."""


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


def evaluate(trainer: Trainer, dataset, state: TrainState, shard: dict) -> dict[str, float]:
    """Held-out loss and the loss function's metrics, averaged over train.eval_batches batches (the loss in
    proportion to the batches' LOSS_WEIGHT, where the loss function returns one)."""
    t = trainer.config.train
    results = jax.device_get([trainer.eval_step(state.params, to_global(
        dataset.batch(i, t.batch_size, split="validation", **shard), trainer.data_sharding, t.batch_size))
        for i in range(t.eval_batches)])
    out = {f"eval_{k}": float(np.mean([r[k] for r in results])) for k in results[0] if k != LOSS_WEIGHT}
    weights = [float(r[LOSS_WEIGHT]) for r in results if LOSS_WEIGHT in r]
    if weights and sum(weights) > 0:
        out["eval_loss"] = float(np.dot([float(r["loss"]) for r in results], weights) / sum(weights))
    return out


def data_row_offset(restored: Restored | None, batch_size: int) -> int:
    """Where the batches continue: the global batch of step k starts at example offset + k x batch_size of the
    data stream, so that a checkpoint's step continues at the example it had reached, whatever batch size."""
    return restored.metadata.data_rows - restored.metadata.step * batch_size if restored else 0


def stop_diverged(logger: MetricsLogger, store: CheckpointStore, event: GuardEvent, skips: int) -> None:
    """Too many updates skipped in a row: nothing more is saved (the newest checkpoint stays the last good one)."""
    store.wait()
    newest = store.steps()[-1] if store.steps() else None
    kept = f"checkpoint {store.path(newest)} is the last good state" if newest is not None else "nothing was saved"
    message = (f"{skips} updates in a row were skipped ({event.reason}, loss {event.loss:.4g}, gradient norm "
               f"{event.grad_norm:.4g}) up to step {event.step}: the run is not recovering by itself; {kept}. "
               f"Lower optimizer.learning_rate, check the data, or raise guards.max_consecutive_skips")
    log_event(logger, event.step, "diverged", message, logging.ERROR, skips=skips, reason=event.reason,
              checkpoint=None if newest is None else str(store.path(newest)), exit_code=EXIT_DIVERGED)
    logger.close()
    raise TrainingDiverged(message)


def log_skipped_update(logger: MetricsLogger, event: GuardEvent) -> None:
    # The values are nested so that readers picking rows by their "loss" key see only training rows.
    log_event(logger, event.step, "update_skipped",
              f"update skipped: {event.reason} (loss {event.loss:.4g}, gradient norm {event.grad_norm:.4g})",
              logging.WARNING, reason=event.reason, values={"loss": event.loss, "grad_norm": event.grad_norm})


@dataclass
class Run:
    """What the loop works with, once every check has passed."""

    trainer: Trainer
    dataset: Any
    step_fn: Any  # the compiled train step
    tokens_per_step: int
    flops_per_token: float | None
    profiler: StepProfiler
    compile_s: float  # compiling the train step
    startup_s: float = 0.0  # the rest of planning, opening the data, building and compiling (set by train)
    started: float = 0.0  # time.time() when train was called


def prepare(config: Config, model, loss_fn: LossFn | None, data, eval_data) -> Run:
    """plan -> data -> build -> compile, then the checkpoints: every check before anything is written."""
    builtin = model is None
    profiler = StepProfiler(config.profile, config.resolved_run_dir(), config.train.steps)
    newest = newest_metadata(config)
    plan = plan_run(config, jax.device_count(), builtin_model=builtin,
                    checkpoint_per_device_batch=newest.per_device_batch if newest else None)
    config = plan.config
    if config.posttrain.method != "none":
        data, eval_data = posttrain_data(config, model, data, eval_data)
    dataset = open_data(config, data, eval_data, builtin)
    example = None
    if data is not None:
        example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for k, v in dataset.example_batch(config.train.batch_size).items()}
    trainer = build(plan, jax.devices(), model, loss_fn, example)
    if builtin and config.model.init_from.startswith(RUN_PREFIX):
        check_run_params(config, trainer.abstract_state().params)
    if config.posttrain.method == "dpo" and loss_fn is None:  # frozen: the step computes the training pairs'
        attach_reference(trainer, data if config.posttrain.reference == "cached" else None, eval_data)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.data_sharding)
                      for k, v in (example or lm_batch_spec(config)).items()}
    compile_started = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state(), abstract_batch).compile()
    compile_s = time.perf_counter() - compile_started
    check_memory(compiled, plan)  # the executable that trains: no second compilation
    tokens = tokens_per_step(config, example)
    flops_per_token = config.model.flops_per_token() if builtin else user_flops_per_token(trainer, abstract_batch,
                                                                                           tokens)
    trainer.open_checkpoints()  # last: created, cleaned up or cleared only once every check has passed
    return Run(trainer, dataset, compiled, tokens, flops_per_token, profiler, compile_s)


def check_memory(compiled, plan) -> None:
    """Refuse a step that needs more memory than a device has, with the nearest layouts that fit (built-in
    decoder: the planner's estimates); report its bytes otherwise."""
    config = plan.config

    device = jax.local_devices()[0]

    def fitting_plans(limit: float) -> list[str] | None:
        if not plan.builtin_model:
            return None
        accelerator = accelerator_for_device_kind(device.device_kind)
        if accelerator is None:
            return None
        rates = rates_for(accelerator.key, config.train.compute_dtype)
        return nearest_fitting(config, jax.device_count(), rates, limit, step_memory(compiled).device_bytes)

    check_step_memory(compiled, device, config.train.memory_limit_gb, config.name, fitting_plans)


def posttrain_data(config: Config, model, data, eval_data):
    """The rows of posttrain.method's data, for the built-in decoder; a user's model or data is refused."""
    if model is not None or data is not None or eval_data is not None:
        raise ConfigError(f"posttrain.method={config.posttrain.method} fine-tunes the built-in decoder on "
                          f"posttrain.source; pass no model or data, or set posttrain.method=none")
    return open_posttrain_data(config)


def newest_metadata(config: Config):
    """The metadata of the checkpoint a resume would continue from (an elastic restart sizes its microbatches
    by it), read without creating or cleaning up anything."""
    directory = checkpoint_dir(config)
    if not config.checkpoint.resume or not directory.is_dir():
        return None
    reader = CheckpointStore(directory, config.checkpoint, read_only=True)
    try:
        return reader.newest_metadata()
    finally:
        reader.close()


def user_flops_per_token(trainer: Trainer, batch: dict, tokens: int) -> float | None:
    """For MFU: FLOPs per token of a user's model, from XLA's cost analysis."""
    flops, loops = model_flops(trainer.model, trainer.config, trainer.mesh, trainer.shardings, batch,
                               trainer.plan.per_device_batch)
    if loops:
        log.warning("the model's program loops (a scan over layers, a while loop): XLA's cost analysis counts a "
                    "loop's body once, so MFU is undercounted by about the loop's length")
    return flops / tokens if flops else None


def newest_checkpoint(config: Config) -> str:
    """The newest finalized checkpoint's path (Orbax renames a checkpoint into place once it is complete)."""
    directory = checkpoint_dir(config)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    return str(directory / str(steps[-1])) if steps else f"none yet (in {directory})"


def train(config: Config, model=None, loss_fn: LossFn | None = None, data=None, eval_data=None) -> TrainResult:
    """Train to config.train.steps, continuing from the newest good checkpoint of the run unless
    checkpoint.resume=false. SIGTERM / SIGINT: finish the step, save, and return with `preempted` set.

    model: a factory `rngs -> nnx.Module` or a `flax.linen.Module` (default: the built-in decoder of
    config.model). loss_fn(model, batch, rngs) -> loss | (loss, metrics) (default: next-token cross entropy).
    data / eval_data: random-access sources of dicts of arrays, or grain.MapDatasets (default: config.data).
    """
    show_log_lines()
    started, clock_started = time.time(), time.perf_counter()
    with PreemptionWatcher() as watcher, RunLock(config.resolved_run_dir()), \
            PeerWatchdog(lambda: newest_checkpoint(config)):
        run = prepare(config, model, loss_fn, data, eval_data)
        run.started, run.startup_s = started, time.perf_counter() - clock_started - run.compile_s
        try:
            return loop(run, watcher)
        finally:
            run.profiler.close()  # a loop that raised inside the profiled window leaves no trace running
            run.trainer.close()


def show_log_lines() -> None:
    """In a script or a notebook the run's log lines (start, resume, checkpoints, evaluation) show on stderr at
    INFO, unless jaxscale's logger was set up, or the root logger was set to show INFO (as the CLI does)."""
    root = logging.getLogger()
    if log.handlers or log.level != logging.NOTSET or (root.handlers and root.level <= logging.INFO):
        return
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s jaxscale: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, not when the handler was made: a notebook or a
    test runner may replace (and close) the stream the first run saw."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


# Settings that change how a run is carried out, not what it trains: a finished run rerun with other values of
# these is still that run.
HOW_NOT_WHAT = ("name", "run_dir", "plan", "train.steps", "train.progress", "train.log_every", "train.eval_",
                "train.remat", "train.scan_unroll", "train.memory_limit_gb", "train.offload_",
                "data.prefetch", "mesh.", "sharding.", "checkpoint.", "tracking.", "profile.", "stragglers.")


def restore(run: Run) -> tuple[TrainState, Restored | None]:
    trainer = run.trainer
    restored = trainer.restore() if trainer.config.checkpoint.resume else None
    if restored:
        refuse_finished_run_of_other_config(trainer.config, restored)
    return (restored.state if restored else trainer.init_state()), restored


def refuse_finished_run_of_other_config(config: Config, restored: Restored) -> None:
    """A finished run is returned as recorded when trained again (a notebook cell run twice), but only with
    the configuration it was trained with: its metrics are not another configuration's."""
    if restored.metadata.step < config.train.steps:
        return  # an unfinished run continues under changed settings (logged as changes)
    changes = [c for c in config_changes(restored.metadata.config, config.to_dict()) if not c.startswith(HOW_NOT_WHAT)]
    if changes:
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise ConfigError(
            f"{config.resolved_run_dir()} holds a run that finished at step {restored.metadata.step} with another "
            f"configuration ({shown}), so its results are not this configuration's. Give this one another "
            f"run_dir, or start it over there with checkpoint.resume=false and checkpoint.overwrite=true "
            f"(deleting that run's checkpoints); to train that run further, raise train.steps only")


def start_run_dir(config: Config, trainer: Trainer, dataset, builtin: bool) -> epath.Path:
    run_dir = config.resolved_run_dir()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    what = f"model {config.model.style}" if builtin else "the given model"
    log.info("mesh %s; %s with %.1fM parameters", describe(trainer.mesh), what, trainer.model.param_count() / 1e6)
    log.info("data:\n%s", dataset.summary())
    if trainer.plan.elastic_note:
        log.info(trainer.plan.elastic_note)
    if trainer.mesh.shape["pipeline"] > 1:
        plan = plan_from_config(config.pipeline, config.model.staged_layers, trainer.mesh.shape["pipeline"])
        log.info("%s", describe_plan(plan, config.pipeline.schedule))
        if config.model.staged_layers != config.model.n_layers:
            log.info("pipeline: the table counts groups of model.moe.every=%d layers", config.model.moe.every)
    return run_dir


def loop(run: Run, watcher: PreemptionWatcher) -> TrainResult:
    trainer, dataset, store = run.trainer, run.dataset, run.trainer.store
    config, t = trainer.config, trainer.config.train
    is_main = jax.process_index() == 0
    clock = GoodputClock(config.resolved_run_dir(), is_main, run.started)
    clock.add("compile", run.compile_s)
    clock.add("startup", run.startup_s)
    restore_started = time.perf_counter()
    state, restored = restore(run)  # the last check: the checkpoint must fit the model
    # a fresh run's "restore" initializes the state: part of starting up
    clock.add("restore" if restored else "startup", time.perf_counter() - restore_started)
    run_dir = start_run_dir(config, trainer, dataset, trainer.plan.builtin_model)
    trackers = Trackers(config.tracking, run_dir, config.to_dict(), config.name, is_main)
    straggler_monitor = StragglerMonitor(config.stragglers, jax.process_count(), config.data.prefetch)
    profiler = run.profiler
    step = restored.metadata.step if restored else 0
    row_offset = data_row_offset(restored, t.batch_size)
    rollbacks = Rollbacks(config.guards.max_rollbacks,
                          set(restored.metadata.skipped_batches) if restored else set())

    # Data: a pure function of the step; each process reads only the rows of the global batch its devices hold.
    shard = batch_shard(trainer.data_sharding, t.batch_size)
    history: list[dict] = []  # the rows written to metrics.jsonl, across rollbacks
    session_started = time.perf_counter()

    def open_logger(start_step: int, tokens_before: int = 0) -> MetricsLogger:
        return MetricsLogger(run_dir, total_steps=t.steps, start_step=start_step, log_every=t.log_every,
                             tokens_per_step=run.tokens_per_step, flops_per_token=run.flops_per_token,
                             n_devices=jax.device_count(), show_progress=t.progress,
                             is_main_process=is_main, started=session_started,
                             tokens_before=tokens_before, trackers=trackers)

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
                  checkpoint=str(restored.path), damaged=damaged, elastic=trainer.plan.elastic_note)
        saved_batch = restored.metadata.config["train"]["batch_size"]
        if saved_batch != t.batch_size:
            log_event(logger, step, "batch_size_changed",
                      f"train.batch_size changed from {saved_batch} to {t.batch_size}: the data continues at "
                      f"example {restored.metadata.data_rows}, where the checkpoint left it (no example is "
                      f"skipped or repeated); the learning-rate schedule still counts steps", logging.WARNING,
                      old=saved_batch, new=t.batch_size, data_rows=restored.metadata.data_rows)
    else:
        log_event(logger, step, "start", f"starting from scratch; checkpoints go to {store.directory}")
    if step >= t.steps:
        log.info("the run is already complete (train.steps=%d); raise train.steps to train further", t.steps)

    # Advances the step without an update: for batches taken out by a rollback.
    skip_batch = jax.jit(lambda s: s.replace(step=s.step + 1), in_shardings=(trainer.shardings,),
                         out_shardings=trainer.shardings, donate_argnums=0)
    monitor, schedule = GuardMonitor(), SaveSchedule(config.checkpoint)
    preempted = False
    if step < t.steps:
        clock.start_loop(step)
    while step < t.steps and not preempted:
        with Prefetcher(dataset, step, t.batch_size, depth=straggler_monitor.depths[jax.process_index()],
                        row_offset=row_offset, **shard) as batches:
            for position, batch, wait_s in batches:  # position: the batch index = the steps done so far
                clock.add("data_wait", wait_s)
                straggler_monitor.push(wait_s)
                events = []
                if position in rollbacks.skipped_batches:
                    state = skip_batch(state)
                    log_event(logger, position + 1, "batch_skipped",
                              f"skipping batch {position} (a rollback took it out)", batch=position)
                else:
                    profiler.before(position + 1)
                    state, metrics = run.step_fn(state, to_global(batch, trainer.data_sharding, t.batch_size))
                    logger.push(position, metrics, wait_s)
                    events.append(monitor.push(position, metrics))
                    with clock.timing("profile"):
                        profiler.after(position + 1, state)
                step = position + 1
                if step % t.log_every == 0:
                    clock.record(step)
                checked = straggler_monitor.check(step, batches)  # a collective: all processes, every step
                if checked:
                    observe_stragglers(checked, step, logger, trackers, batches)
                stop = watcher.should_stop(step)
                save = schedule.due(step) or stop or step == t.steps
                evaluate_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
                if save or evaluate_now:  # what is saved or evaluated must have passed its guard
                    events.append(monitor.flush())
                events = [e for e in events if e is not None]
                for event in events:
                    log_skipped_update(logger, event)
                if monitor.consecutive_skips >= config.guards.max_consecutive_skips:
                    stop_diverged(logger, store, events[-1], monitor.consecutive_skips)
                if events and config.guards.on_nonfinite == "rollback":
                    store.wait()  # a save in flight is the newest good state
                    back = trainer.restore()
                    step = back.metadata.step if back else 0
                    row_offset = data_row_offset(back, t.batch_size)
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
                    with clock.timing("eval"):
                        logger.write({"step": step, **evaluate(trainer, dataset, state, shard)})
                if save:
                    with clock.timing("checkpoint"):
                        trainer.save(state, step, rollbacks.skipped_batches, row_offset + step * t.batch_size)
                    clock.record(step, "checkpoint")
                    schedule.saved()
                    log_event(logger, step, "checkpoint", f"saving checkpoint {store.path(step)}",
                              path=str(store.path(step)))
                if stop and step < t.steps:  # at the last step the run is simply complete
                    with clock.timing("checkpoint"):
                        store.wait()
                    log_event(logger, step, "preempted",
                              f"preemption notice: checkpoint {store.path(step)} is saved; exiting with code "
                              f"{EXIT_PREEMPTED}. Rerun the same command to continue", logging.WARNING,
                              exit_code=EXIT_PREEMPTED)
                    preempted = True
                    break
                if step >= t.steps:
                    break
    with clock.timing("checkpoint"):
        store.wait()
    profiler.close()
    close_logger(logger)
    trackers.close()
    observed = {"stragglers": straggler_monitor.reports}
    if clock.loop_started is not None:
        clock.record(step, "end")
        clock.close()
        observed["goodput"] = goodput.account(run_dir) if is_main else None
        if observed["goodput"]:
            log.info("%s", goodput.describe(observed["goodput"]))
    return finish(history, trainer, state, preempted, run_dir, logger.tokens_trained,
                  time.perf_counter() - session_started, observed)


def observe_stragglers(checked: tuple[dict, list[dict]], step: int, logger: MetricsLogger, trackers: Trackers,
                       batches: Prefetcher) -> None:
    """Every process's window figures to the trackers (under host/<i>/), and each straggler reported: a
    warning, an event row, and a deeper prefetch on the process slow for its data."""
    figures, reports = checked
    trackers.write({"step": step, "host": {str(process): values for process, values in figures.items()}})
    for report in reports:
        log_event(logger, step, "straggler", stragglers.describe(report), logging.WARNING,
                  **{k: v for k, v in report.items() if k != "step"})
        if report["process"] == jax.process_index() and report["prefetch_depth"] is not None:
            batches.set_depth(report["prefetch_depth"])


def finish(history: list[dict], trainer: Trainer, state: TrainState, preempted: bool, run_dir: epath.Path,
           tokens: int, wall_s: float, observed: dict) -> TrainResult:
    """The session's summary: every step it trained counts, also those after the last log row (a preempted
    run saves at the step it stopped at). A session that found the run complete returns the rows the run
    recorded (and leaves its summary.json as it was), so rerunning a notebook cell shows the same curve."""
    rows = [row for row in history if "event" not in row]
    summary = write_run_summary(rows, run_dir, tokens, wall_s, observed)
    if not any("loss" in row for row in rows) and (run_dir / "metrics.jsonl").exists():
        recorded = read_metrics(run_dir)
        rows = [row for row in recorded if "event" not in row]
        history = [row for row in recorded if "event" in row] + [row for row in history if "event" in row]
    return TrainResult(state, rows, trainer.config, [row for row in history if "event" in row], preempted, summary,
                       trainer.model)


def write_run_summary(rows: list[dict], run_dir: epath.Path, tokens: int, wall_s: float, observed: dict) -> dict:
    """Tokens, time, measured energy and the cost at the catalog's price for this session of the run, with what
    `observed` adds (the goodput account of the whole run, stragglers). A session that trained nothing (the run
    was already complete) leaves the previous session's summary.json as it is."""
    accelerator = accelerator_for_device_kind(jax.devices()[0].device_kind)
    trained = [r for r in rows if "loss" in r]
    summary = {**run_summary(trained, accelerator, chips=jax.device_count(), tokens=tokens, wall_s=wall_s),
               **observed}
    if not trained:
        return summary
    if jax.process_index() == 0:
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
        (run_dir / "summary.json").write_text(json.dumps(finite, indent=1, allow_nan=False) + "\n")
    known = {k: v for k, v in summary.items() if v is not None and k not in observed}
    log.info("run summary: %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in known.items()))
    return summary
