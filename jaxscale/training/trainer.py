"""From a config (and optionally the user's model, loss and data) to a mesh, sharded state and compiled steps.

    plan_run   the run plan, worked out once: the config checked against the devices, the mesh sizes, the
               per-device batch (and, for elastic restarts, the mesh and microbatches refit to the devices)
    build      mesh -> model -> optimizer -> shardings -> compiled train and eval steps
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from jaxscale.checkpointing import CheckpointError, CheckpointStore, Restored, RunInfo
from jaxscale.config import DEFAULT_ACTIVATION_RULES, DEFAULT_PARAM_RULES, Config, validate
from jaxscale.errors import ConfigError
from jaxscale.hf import initial_params
from jaxscale.mesh import build_mesh
from jaxscale.model import FlaxModel, LossFn, flax_model
from jaxscale.model.run_source import RUN_PREFIX
from jaxscale.platforms import devices_platform
from jaxscale.run_files import run_path
from jaxscale.sharding import names_used
from jaxscale.training.elastic import adapt_to_devices, per_device_batch
from jaxscale.training.guards import guard_updates
from jaxscale.training.language_model import (
    builtin_factory,
    compute_dtype_for,
    lm_batch_spec,
    model_options,
    next_token_loss,
    plain_next_token_loss,
)
from jaxscale.training.optimizer import build_optimizer
from jaxscale.training.posttrain import posttrain_loss
from jaxscale.training.reference import reference_log_probs
from jaxscale.training.run_init import run_params
from jaxscale.training.step import (
    TrainState,
    batch_sharding,
    init_state,
    make_eval_step,
    make_train_step,
    state_from_params,
    state_shardings,
)

log = logging.getLogger("jaxscale")


@dataclass(frozen=True)
class RunPlan:
    """The config as it will run on these devices, with what follows from it."""

    config: Config  # for elastic restarts: the mesh and microbatches refit to the devices
    mesh_sizes: dict[str, int]
    per_device_batch: int  # sequences (examples) per device and microbatch
    builtin_model: bool
    elastic_note: str | None = None  # what an elastic restart changed


def plan_run(config: Config, n_devices: int, *, builtin_model: bool = True,
             checkpoint_per_device_batch: int | None = None, device_kind: str | None = None) -> RunPlan:
    """Check the config against the devices, once. `checkpoint_per_device_batch`: that of the checkpoint an
    elastic run resumes from, which its microbatches keep. With plan=auto the layout is the planner's top
    choice for `n_devices` of `device_kind` (default: this machine's)."""
    note = None
    if config.plan == "auto":
        if not builtin_model:
            raise ConfigError("plan=auto plans the built-in decoder's layout (its shape is what the planner "
                              "estimates); for your own model set the mesh yourself")
        from jaxscale.planner.plan import auto_layout

        config = auto_layout(config, n_devices, device_kind or jax.devices()[0].device_kind)
    if config.train.elastic:
        config, note = adapt_to_devices(config, n_devices, checkpoint_per_device_batch)
    sizes = validate(config, n_devices, builtin_model=builtin_model)
    return RunPlan(config, sizes, per_device_batch(config, sizes), builtin_model, note)


@dataclass
class Trainer:
    """Everything a training loop needs. Researchers writing their own loop start here."""

    config: Config
    mesh: Mesh
    model: FlaxModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    data_sharding: NamedSharding
    train_step: Callable  # (state, global batch) -> (state, metrics)
    eval_step: Callable  # (params, global batch) -> {"loss": ..., **the loss function's metrics}
    plan: RunPlan
    _store: CheckpointStore | None = field(default=None, repr=False)

    def init_state(self) -> TrainState:
        """The state at step 0, created sharded: drawn from the seed, or, with the built-in decoder and
        model.init_from=hf:<dir> (or run:<dir>), the Hugging Face model's weights (or the parameters of that run's
        newest checkpoint), each device reading only its own blocks."""
        if self.plan.builtin_model and self.config.model.init_from:
            read = run_params if self.config.model.init_from.startswith(RUN_PREFIX) else initial_params
            return state_from_params(read(self.config, self.abstract_state().params), self.tx, self.shardings)
        return init_state(self.model, self.tx, self.shardings, self.config.train.seed)

    def abstract_state(self) -> TrainState:
        """Shape, dtype and sharding of every array of the state, without computing any: the target that a
        checkpoint restores into, each device reading only its own pieces."""
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.model.shapes,
                            opt_state=jax.eval_shape(self.tx.init, self.model.shapes),
                            reference=self.model.shapes if self.shardings.reference is not None else None)
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, self.shardings)

    @property
    def store(self) -> CheckpointStore:
        """The run's checkpoints (`checkpoint.dir`, else <run_dir>/checkpoints), opened on first use."""
        return self.open_checkpoints()

    def open_checkpoints(self) -> CheckpointStore:
        """Open the checkpoint directory once: created, a save cut short cleaned up, and with
        checkpoint.resume=false existing checkpoints refused or (overwrite=true) deleted."""
        if self._store is None:
            self._store = open_checkpoints(self.config)
        return self._store

    def save(self, state: TrainState, step: int | None = None, skipped_batches: set[int] = frozenset(),
             data_rows: int | None = None) -> None:
        """Checkpoint `state` (asynchronously; `wait()` or `close()` to be sure it is written). `data_rows`: the
        examples read so far (default: step x train.batch_size)."""
        step = int(jax.device_get(state.step)) if step is None else step
        rows = step * self.config.train.batch_size if data_rows is None else data_rows
        self.store.save(step, state, run_info(self.plan, skipped_batches, rows))

    def restore(self) -> Restored | None:
        """The newest good checkpoint restored onto this trainer's mesh (`.state`, `.metadata.step`), or None."""
        return self.store.restore_newest(self.abstract_state())

    def wait(self) -> None:
        self.store.wait()

    def close(self) -> None:
        """Waits for saves in flight and lets the checkpoint directory go (the next save opens it again)."""
        if self._store is not None:
            self._store.close()
            self._store = None


def checkpoint_dir(config: Config) -> epath.Path:
    if config.checkpoint.dir:
        return run_path(config.checkpoint.dir, "checkpoint.dir")
    return config.resolved_run_dir() / "checkpoints"


def open_checkpoints(config: Config) -> CheckpointStore:
    """The run's checkpoints, to resume from and save to. Starting over (checkpoint.resume=false) where a run
    already saved some deletes them only if checkpoint.overwrite=true says so."""
    store = CheckpointStore(checkpoint_dir(config), config.checkpoint)
    steps = store.steps()
    if config.checkpoint.resume or not steps:
        return store
    if not config.checkpoint.overwrite:
        store.close()
        raise CheckpointError(
            f"checkpoint.resume=false, but {store.directory} already holds the checkpoints of a run "
            f"(steps {', '.join(map(str, steps))}). To continue that run, drop checkpoint.resume=false; "
            f"to delete them and start over, add --set checkpoint.overwrite=true; or choose another run_dir")
    log.warning("checkpoint.overwrite=true: deleting the checkpoints at steps %s in %s", steps, store.directory)
    store.delete_all()
    return store


def run_info(plan: RunPlan, skipped_batches, data_rows: int) -> RunInfo:
    config = plan.config
    return RunInfo(seed=config.train.seed, mesh=plan.mesh_sizes, microbatches=config.train.microbatches,
                   per_device_batch=plan.per_device_batch, process_count=jax.process_count(),
                   skipped_batches=sorted(skipped_batches), data_rows=data_rows, config=config.to_dict())


def resolve_model(config: Config, model, loss_fn: LossFn | None, example_batch, platform: str) -> FlaxModel:
    """The model the run trains: the built-in decoder unless `model` is given; next-token cross entropy (or the
    loss of posttrain.method) unless `loss_fn` is given. `platform`: that of the devices the step is compiled for."""
    if model is None:
        loss_fn = (loss_fn or posttrain_loss(config, model_options(config, platform))
                   or next_token_loss(config, platform))
        return flax_model(builtin_factory(config), loss_fn, example_batch)
    if config.train.matmul_dtype != "compute":  # the setting reaches the built-in decoder's einsums only
        raise ConfigError(f"train.matmul_dtype={config.train.matmul_dtype} applies to the built-in decoder; a model "
                          f"of your own does its own matmuls (jaxscale.kernels.fp8.matmul does them in fp8): "
                          f"remove the setting")
    return flax_model(model, loss_fn or plain_next_token_loss, example_batch)


def check_rules(config: Config, model: FlaxModel) -> None:
    """Rules the model cannot use: a parameter rule for a name no parameter carries is refused (a typo), with a
    close match; an activation rule for a name nothing known carries is reported (a constraint inside the model
    may use it: Flax's are not seen from here); parameters with no names are replicated, with one warning."""
    used = names_used(model.logical_axes)
    for name in config.sharding.params:
        if name not in DEFAULT_PARAM_RULES and name not in used:
            close = difflib.get_close_matches(name, sorted(used), n=1)
            raise ConfigError(f"sharding.params.{name}: no parameter of the model has a dimension named {name!r}, "
                              f"so the rule would do nothing; "
                              + (f"did you mean sharding.params.{close[0]}?" if close else
                                 f"the model's names are: {', '.join(sorted(used)) or 'none'}"))
    known = used | set(DEFAULT_ACTIVATION_RULES)
    for name in config.sharding.activations:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            log.warning("sharding.activations.%s: no parameter and no built-in activation has a dimension of that "
                        "name%s; if only a constraint in your model uses it, all is well", name,
                        f" (did you mean sharding.activations.{close[0]}?)" if close else "")
    if model.unannotated:
        shown = ", ".join(model.unannotated[:6]) + (f" and {len(model.unannotated) - 6} more"
                                                    if len(model.unannotated) > 6 else "")
        log.warning("%d parameters carry no partitioning names and are replicated on every device: %s. Name "
                    "their dimensions (nnx.with_partitioning / nn.with_logical_partitioning) to shard them",
                    len(model.unannotated), shown)


def build(plan: RunPlan, devices: list, model=None, loss_fn: LossFn | None = None, example_batch=None) -> Trainer:
    """Mesh -> model -> optimizer -> shardings -> compiled steps, for a checked plan."""
    config = plan.config
    mesh = build_mesh(config.mesh, devices)
    platform = devices_platform(mesh.devices)  # e.g. a TPU topology's while compiling on a CPU host
    flax = resolve_model(config, model, loss_fn, lm_batch_spec(config) if example_batch is None else example_batch,
                         platform)
    check_rules(config, flax)
    moe = config.model.moe if plan.builtin_model else None
    tx, schedule = build_optimizer(config.optimizer, config.train.steps, flax,
                                   balance_rate=moe.bias_update_rate if moe else 0.0)
    tx = guard_updates(tx, config.guards)
    frozen = plan.builtin_model and config.posttrain.method == "dpo" and config.posttrain.reference == "frozen"
    shardings = state_shardings(flax, tx, mesh, config.sharding.params, config.train.offload_optimizer,
                                config.train.offload_params, frozen)
    data_sharding = batch_sharding(mesh, config.sharding.activations)
    reference_fn = reference_log_probs(flax, model_options(config, platform)) if frozen else None
    return Trainer(config, mesh, flax, tx, schedule, shardings, data_sharding,
                   train_step=make_train_step(flax, tx, schedule, config, mesh, shardings, data_sharding,
                                              plan.per_device_batch, compute_dtype_for(config, platform),
                                              reference_fn),
                   eval_step=make_eval_step(flax, config, mesh, shardings, data_sharding, plan.per_device_batch),
                   plan=plan)


def build_trainer(config: Config, devices: list | None = None, *, model=None, loss_fn: LossFn | None = None,
                  example_batch: dict | None = None) -> Trainer:
    """The trainer for `config`: the built-in decoder and next-token loss, or the given model (a factory
    `rngs -> nnx.Module`, or a `flax.linen.Module`) and `loss_fn(model, batch, rngs)`. A Linen model is
    initialized by running the loss on `example_batch` (arrays or jax.ShapeDtypeStruct, one global batch)."""
    devices = devices if devices is not None else jax.devices()
    plan = plan_run(config, len(devices), builtin_model=model is None, device_kind=devices[0].device_kind)
    return build(plan, devices, model, loss_fn, example_batch)
