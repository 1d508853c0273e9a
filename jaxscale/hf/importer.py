"""Hugging Face checkpoints -> jaxscale parameters, each tensor placed straight onto its shards of the mesh.

Every device's block of every parameter is read from the memory-mapped safetensors files by itself
(`jax.make_array_from_callback`): a host reads its own devices' blocks, and beyond them at most the rest of one
HF tensor's rows, where a block cuts across a tensor that is fused or transposed on the way.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxscale.config import DEFAULT_PARAM_RULES, Config, MeshConfig, from_dict, validate
from jaxscale.errors import ConfigError
from jaxscale.hf.layout import Placement, by_param, fill_block, placements
from jaxscale.hf.safetensors_io import FLOAT_DTYPES, CheckpointReader
from jaxscale.mesh import build_mesh
from jaxscale.model import Model, ModelConfig
from jaxscale.model.hf_config import PREFIX, model_directory, resolve_init_from
from jaxscale.sharding import param_shardings

# Buffers some checkpoints carry that are not weights: GPT-2's causal mask, old rotary frequency tables.
NOT_WEIGHTS = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


def load(path: str | Path, config: Config | None = None) -> tuple[Model, dict]:
    """(model, params) of the HF model directory `path`: `model.apply(params, tokens)` gives logits (batch,
    length, padded vocabulary), the padding ids' at the dtype's lowest value. With `config`, the parameters are
    laid out over the mesh that config.mesh and config.sharding.params describe, in config.train.param_dtype;
    without, on one device in float32."""
    directory = model_directory(str(path), "jaxscale.hf.load path")
    section = resolve_init_from({"init_from": PREFIX + str(directory)})
    if config is not None:
        section["attention"] = config.model.attention
    cfg = from_dict(ModelConfig, section, "model.").resolved()
    if config is None:
        mesh, rules, dtype = build_mesh(MeshConfig(data=1), jax.devices()[:1]), DEFAULT_PARAM_RULES, jnp.float32
    else:
        validate(dataclasses.replace(config, model=cfg), jax.device_count())
        mesh, rules, dtype = build_mesh(config.mesh), config.sharding.params, jnp.dtype(config.train.param_dtype)
    model = Model.build(cfg, dtype)
    shardings = param_shardings(model.logical_axes, model.shapes, mesh, rules)
    abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            model.shapes, shardings)
    return model, read_params(directory, cfg, abstract)


def initial_params(config: Config, abstract_params: dict) -> dict:
    """The parameters that `config.model.init_from` (hf:<dir>) names, laid out as `abstract_params` (a tree of
    jax.ShapeDtypeStruct with shardings, e.g. a trainer's abstract state's params). `load_config` has already
    taken the model's shape from that directory's config.json; a config built otherwise must agree with it."""
    resolve_init_from(dataclasses.asdict(config.model))  # raises where a model key disagrees with config.json
    return read_params(model_directory(config.model.init_from, "model.init_from"), config.model, abstract_params)


def read_params(directory: Path, cfg: ModelConfig, abstract: dict) -> dict:
    """Every parameter of a model shaped as `cfg`, read from `directory` into the layout of `abstract`."""
    with CheckpointReader(directory) as reader:
        prefix = "transformer." if "transformer.wte.weight" in reader.names() else ""
        places = placements(cfg, prefix)
        shapes = {tuple(key.key for key in path): leaf.shape
                  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        check_tensors(reader, cfg, places, shapes)
        grouped = by_param(places)

        def build(path, leaf):
            param = tuple(key.key for key in path)

            def block(index):
                return fill_block(leaf.shape, leaf.dtype, index, grouped[param], reader.read)

            return jax.make_array_from_callback(leaf.shape, leaf.sharding, block)

        params = jax.tree_util.tree_map_with_path(build, abstract)
        jax.block_until_ready(params)  # every read is done before the files close
        return params


def check_tensors(reader: CheckpointReader, cfg: ModelConfig, places: list[Placement],
                  shapes: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    """Before reading anything: every tensor is there, nothing unknown is, and each has a float dtype and the
    shape that config.json implies."""
    config_json = reader.directory / "config.json"
    unplaced = sorted(set(shapes) - {p.param for p in places})
    if unplaced:
        raise ConfigError(f"model config {cfg} has parameters no Hugging Face tensor fills: {unplaced}")
    names = reader.names()
    missing = [p.name for p in places if p.name not in names]
    if missing:
        hint = (f"; {config_json} sets tie_word_embeddings=false, which needs it" if missing[0] == "lm_head.weight"
                else "")
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{reader.directory} has no tensor {missing[0]}{more}{hint}: the weights do not belong "
                          f"to the model that config.json describes, or the download is incomplete")
    known = {p.name for p in places} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unknown = sorted(name for name in names - known if not NOT_WEIGHTS.search(name))
    if unknown:
        raise ConfigError(f"{reader.directory} holds tensors that a {cfg.style} model as {config_json} describes "
                          f"does not have, e.g. {unknown[:3]}: an architecture variant jaxscale does not support")
    for p in places:
        file = reader.files[p.name]
        dtype = reader.dtype_name(p.name)
        if dtype not in FLOAT_DTYPES:
            raise ConfigError(f"{file}: tensor {p.name} has dtype {dtype}; jaxscale reads {', '.join(FLOAT_DTYPES)}"
                              f" (quantized checkpoints are not supported)")
        expected = p.hf_shape(shapes[p.param])
        if reader.shape(p.name) != expected:
            raise ConfigError(f"{file}: tensor {p.name} has shape {reader.shape(p.name)}, but {config_json} "
                              f"implies {expected}: the weights and the config disagree")
