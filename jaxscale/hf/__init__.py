"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM as safetensors.

    model, params = jaxscale.hf.load("path/to/model")        # logits = model.apply(params, tokens)
    jaxscale train EXPERIMENT --set model.init_from=hf:path/to/model
    jaxscale export RUN_DIR --hf OUT_DIR

`hf_config` maps config.json, `layout` places each tensor in jaxscale's parameter tree, `safetensors_io`
reads and writes the files, `importer` and `exporter` put them together.
"""
from jaxscale.hf.exporter import export
from jaxscale.hf.hf_config import resolve_init_from
from jaxscale.hf.importer import initial_params, load

__all__ = ["export", "initial_params", "load", "resolve_init_from"]
