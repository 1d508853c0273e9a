"""What a run of `posttrain.method` needs from jaxscale.posttrain: its data as rows, and its loss (DPO's reference
log-probabilities: training.reference)."""
from __future__ import annotations

import logging

from jaxscale.config import Config
from jaxscale.data.tokenizers import load_tokenizer
from jaxscale.errors import ConfigError
from jaxscale.model import LossFn
from jaxscale.posttrain.chat import load_template
from jaxscale.posttrain.losses import dpo_loss, sft_loss
from jaxscale.posttrain.rows import build_rows

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


def posttrain_loss(config: Config, options: dict) -> LossFn | None:
    """The loss of posttrain.method for the built-in decoder called with `options` (None: pretraining's)."""
    if config.posttrain.method == "sft":
        return sft_loss(options, config.model.moe)
    if config.posttrain.method == "dpo":
        return dpo_loss(config.posttrain, options, config.model.moe)
    return None
