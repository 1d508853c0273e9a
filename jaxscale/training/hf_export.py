"""`jaxscale export RUN_DIR --hf OUT_DIR`: a run's checkpoint as a Hugging Face model directory.

Everything is checked before anything is written (the run's config, the model's export, the checkpoint, the
tokenizer files, the output directory); the directory is written under a temporary name beside OUT_DIR and
renamed at the end, so OUT_DIR is either complete or absent. The checkpoint restores onto this process's
devices, laid out as the run's mesh where it fits, and each tensor is gathered to the host only when its turn
to be written comes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxscale.checkpointing import CheckpointStore
from jaxscale.config import Config, batch_shards, resolve_mesh_sizes
from jaxscale.data.tokenizers import load_tokenizer
from jaxscale.errors import ConfigError
from jaxscale.hf.layout import placements
from jaxscale.hf.safetensors_io import MAX_SHARD_BYTES, write_checkpoint
from jaxscale.model.hf_config import PREFIX, config_json, read_config_json, special_token_ids
from jaxscale.parallel import plan_from_config
from jaxscale.run_files import run_path
from jaxscale.training.elastic import fit_mesh
from jaxscale.training.run_init import read_run_config
from jaxscale.training.trainer import build_trainer

# What transformers' tokenizers save beside the model; those present in the run's tokenizer directory are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_files(config: Config) -> dict[str, Path]:
    """Output name -> source file, for the run's tokenizer: an hf:<dir>'s files, or a tokenizer.json."""
    name = config.data.tokenizer
    if name == "bytes":
        return {}
    if name.startswith(PREFIX):
        directory = Path(name.removeprefix(PREFIX)).expanduser()
        found = {file: directory / file for file in TOKENIZER_FILES if (directory / file).is_file()}
        if "tokenizer.json" not in found:
            raise ConfigError(f"the run's data.tokenizer={name!r}, but {directory / 'tokenizer.json'} does not "
                              f"exist any more; restore it to export the tokenizer with the model")
        return found
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"the run's data.tokenizer={name!r} does not exist any more; restore it to export the "
                          f"tokenizer with the model")
    return {"tokenizer.json": path}


def special_tokens(config: Config) -> dict:
    """bos/eos/pad ids: those of the checkpoint the run started from, else the tokenizer's end of document."""
    if config.model.init_from:
        directory = Path(config.model.init_from.removeprefix(PREFIX)).expanduser()
        if (directory / "config.json").is_file():
            ids = special_token_ids(read_config_json(directory), config.model.vocab_size)
            if ids:
                return ids
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.eos_token)
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}


def local_config(config: Config, n_devices: int) -> Config:
    """The run's config on this process's devices: its mesh where that fits, else refit (as an elastic restart
    does), with a batch that the mesh divides (no batch is run)."""
    mesh = fit_mesh(config.mesh, n_devices)
    sizes = resolve_mesh_sizes(mesh, n_devices)
    pieces = (plan_from_config(config.pipeline, config.model.n_layers, sizes["pipeline"]).microbatches
              if sizes["pipeline"] > 1 else 1)
    return dataclasses.replace(config, mesh=mesh, train=dataclasses.replace(
        config.train, microbatches=1, batch_size=batch_shards(sizes) * pieces))


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write checkpoint `step` (default: the newest) of the run in `run_dir` to `out_dir` as a Hugging Face
    model directory: config.json, safetensors in the parameters' dtype, and the run's tokenizer files. The run
    directory may be a gs:// URL; `out_dir` is local."""
    run_dir, out = run_path(run_dir, "RUN_DIR"), Path(out_dir)
    if jax.process_count() > 1:
        raise ConfigError("jaxscale export runs as one process; it restores the checkpoint onto that process's "
                          "devices")
    config = read_run_config(run_dir)
    dtype = np.dtype(config.train.param_dtype)
    header = config_json(config.model, str(dtype), special_tokens(config))
    tokenizer = tokenizer_files(config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory; nothing was written. Give a new "
                          f"output directory, or delete that one first")
    checkpoints = run_path(config.checkpoint.dir, "checkpoint.dir") if config.checkpoint.dir else run_dir / "checkpoints"
    store = CheckpointStore(checkpoints, config.checkpoint, read_only=True)
    try:
        steps = store.steps()
        if not steps:
            raise ConfigError(f"{checkpoints} holds no finished checkpoint to export")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"--step {step}: {checkpoints} has no checkpoint of that step; it has "
                              f"{', '.join(map(str, steps))}")
        trainer = build_trainer(local_config(config, jax.local_device_count()), jax.local_devices())
        params = store.restore(step, trainer.abstract_state()).state.params
    finally:
        store.close()

    places = placements(config.model)
    shapes = {p.name: (p.hf_shape(_at(params, p.param).shape), dtype) for p in places}
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        by_name = {p.name: p for p in places}

        def gather(name):  # one tensor at a time: this parameter region, fetched from its shards
            p = by_name[name]
            return p.to_hf(np.asarray(jax.device_get(_at(params, p.param)[p.index])))

        write_checkpoint(staging, shapes, gather, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(header, indent=2) + "\n")
        for target, source in tokenizer.items():
            shutil.copyfile(source, staging / target)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
