"""What the training run needs for `posttrain.method`: the data as rows, the loss, and (DPO) the reference
model's log-probabilities, computed once from the initial model in a first pass over the data."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale.config import Config
from jaxscale.data.tokenizers import load_tokenizer
from jaxscale.errors import ConfigError
from jaxscale.model import LossFn
from jaxscale.posttrain.chat import load_template
from jaxscale.posttrain.losses import dpo_loss, response_log_probs, sft_loss
from jaxscale.posttrain.rows import PreferencePairs, build_rows

log = logging.getLogger("jaxscale")


def open_posttrain_data(config: Config):
    """(train rows, held-out rows or None), tokenized with data.tokenizer through posttrain.chat_template."""
    from jaxscale.data import DataError

    try:
        tokenizer = load_tokenizer(config.data.tokenizer, config.data.eos_token)
    except DataError as e:
        raise ConfigError(str(e)) from e
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} token ids but model.vocab_size is "
                          f"{config.model.vocab_size}; use the model's own tokenizer")
    template = load_template(config.posttrain.chat_template, tokenizer)
    train, validation = build_rows(config.posttrain, template, config.model.seq_len + 1, tokenizer.eos_id)
    if config.train.eval_every and validation is None:
        raise ConfigError(f"train.eval_every={config.train.eval_every} evaluates on held-out examples, but none of "
                          f"posttrain.source is held out: raise posttrain.validation_fraction, set "
                          f"posttrain.validation_source, or set train.eval_every=0")
    log.info("posttrain %s: %s for training; held out: %s", config.posttrain.method, train.describe(),
             validation.describe() if validation is not None else "none")
    return train, validation


def posttrain_loss(config: Config, platform: str) -> LossFn | None:
    """The loss of posttrain.method for the built-in decoder (None: pretraining's)."""
    return {"sft": sft_loss, "dpo": dpo_loss}.get(config.posttrain.method, lambda *_: None)(config, platform)


def attach_reference(trainer, *pair_sets: PreferencePairs | None) -> None:
    """Each pair's reference log-probabilities under the initial model (the seed's, or model.init_from's),
    computed on the trainer's mesh with the parameters sharded as in training, then kept with the pairs. The
    initial model is the same on every start, so a resumed run gets the same values."""
    from jaxscale.platforms import devices_platform
    from jaxscale.training.language_model import model_options
    from jaxscale.training.loop import batch_shard, to_global
    from jaxscale.training.step import tracing_model

    config, mesh = trainer.config, trainer.mesh
    options = model_options(config, devices_platform(mesh.devices))

    def log_probs(params, batch):
        with tracing_model(config, mesh, trainer.plan.per_device_batch):
            model = trainer.model.bind(params)
            model.eval()
            return jnp.stack([response_log_probs(model, batch[f"{side}_tokens"], batch[f"{side}_mask"], options)
                              for side in ("chosen", "rejected")], -1)

    compute = jax.jit(log_probs, in_shardings=(trainer.shardings.params, trainer.data_sharding),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    params = trainer.init_state().params
    size = config.train.batch_size
    shard = batch_shard(trainer.data_sharding, size)
    rows = size // shard["shard_count"]
    for pairs in (p for p in pair_sets if p is not None):
        values = []
        for start in range(0, len(pairs), size):
            # this process's rows of the chunk; past the end, the last pair again (its values are dropped)
            mine = [min(start + shard["shard_index"] * rows + i, len(pairs) - 1) for i in range(rows)]
            batch = {k: np.stack([pairs[i][k] for i in mine]) for k in pairs[0] if k.endswith(("tokens", "mask"))}
            values.append(np.asarray(jax.device_get(compute(params, to_global(batch, trainer.data_sharding, size)))))
        pairs.attach_reference(np.concatenate(values)[:len(pairs)])
    del params
