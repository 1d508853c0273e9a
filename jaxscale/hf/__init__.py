"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM as safetensors.

    model, params = jaxscale.hf.load("path/to/model")        # logits = model.apply(params, tokens)
    jaxscale train EXPERIMENT --set model.init_from=hf:path/to/model
    jaxscale export RUN_DIR --hf OUT_DIR

`layout` places each tensor in jaxscale's parameter tree, `safetensors_io` reads and writes the files,
`importer` puts them together. `jaxscale.model.hf_config` maps config.json (the config loader reads it for
model.init_from); `jaxscale.training.hf_export` writes a run's checkpoint out (it restores a training run).
"""
from jaxscale.hf.importer import initial_params, load
from jaxscale.model.hf_config import resolve_init_from

__all__ = ["initial_params", "load", "resolve_init_from"]
