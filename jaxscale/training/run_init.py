"""`model.init_from=run:<dir>`: a run starts from the parameters of another jaxscale run's newest finished
checkpoint, with fresh optimizer state at step 0 (the run's model section gave the shape: model.run_source)."""
from __future__ import annotations

import dataclasses

from etils import epath

from jaxscale.checkpointing import CheckpointError, CheckpointStore
from jaxscale.config import Config, from_dict, read_yaml
from jaxscale.errors import ConfigError
from jaxscale.model.run_source import model_differences, run_directory
from jaxscale.run_files import run_path


def read_run_config(run_dir: epath.Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give the directory of a `jaxscale train` run (it holds "
                          f"config.yaml and checkpoints/)")
    config = from_dict(Config, read_yaml(path), "")
    config.model = config.model.resolved()
    return config


def run_checkpoint(config: Config) -> tuple[CheckpointStore, int]:
    """(the checkpoints of the run model.init_from names, opened read-only, its newest finished step), once the
    run's model is found to be this config's: a ConfigError naming what is missing or which keys differ."""
    spec = config.model.init_from
    directory = run_directory(spec)
    run = read_run_config(directory)
    differences = model_differences(dataclasses.asdict(config.model), dataclasses.asdict(run.model))
    if differences:
        raise ConfigError(f"model.init_from={spec!r}: this run's model differs from that run's: "
                          f"{'; '.join(differences)}; make them agree (or leave the model keys out)")
    checkpoints = run_path(run.checkpoint.dir, "checkpoint.dir") if run.checkpoint.dir else directory / "checkpoints"
    store = CheckpointStore(checkpoints, run.checkpoint, read_only=True) if checkpoints.is_dir() else None
    steps = store.steps() if store is not None else []
    if not steps:
        if store is not None:
            store.close()
        raise ConfigError(f"model.init_from={spec!r}: {checkpoints} holds no finished checkpoint; train that run "
                          f"until it saves one (checkpoint.every_steps) or start from another")
    return store, steps[-1]


def check_run_params(config: Config, abstract_params: dict) -> None:
    """Every check of `run_params` short of reading the arrays, before anything of this run is written."""
    store, step = run_checkpoint(config)
    try:
        differences = store.param_differences(step, abstract_params)
    finally:
        store.close()
    if differences:
        raise ConfigError(f"model.init_from={config.model.init_from!r}: the parameters of {store.path(step)} "
                          f"differ from this model's:\n  " + "\n  ".join(differences))


def run_params(config: Config, abstract_params: dict) -> dict:
    """The parameters of the newest finished checkpoint of the run model.init_from names, laid out as
    `abstract_params` (each device reads only its own pieces)."""
    store, step = run_checkpoint(config)
    try:
        return store.restore_params(step, abstract_params)
    except CheckpointError as e:
        raise ConfigError(f"model.init_from={config.model.init_from!r}: {e}") from e
    finally:
        store.close()
