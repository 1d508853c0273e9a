"""The `posttrain` config section: which fine-tuning method, on what data, with which loss settings."""
from __future__ import annotations

from dataclasses import dataclass

from jaxscale.errors import ConfigError, check_range

METHODS = ("none", "sft", "dpo")
TRUNCATE_RULES = ("none", "prompt", "end")
DPO_LOSSES = ("sigmoid", "ipo")
REFERENCES = ("cached", "frozen")


@dataclass
class PosttrainConfig:
    # none: pretraining on data.*; sft: chat / prompt-response JSONL; dpo: prompt / chosen / rejected JSONL
    method: str = "none"
    # JSONL file or glob, or hf:<dir> (a Hugging Face dataset written by save_to_disk, or a name in the local
    # datasets cache) whose rows hold the same fields as columns
    source: str = ""
    validation_source: str = ""  # held-out examples, the same kinds; empty: hold out validation_fraction of them
    validation_fraction: float = 0.05  # examples held out, chosen by a hash of their content
    hf_split: str = "train"  # the split of an hf: source that holds several (a DatasetDict)
    validation_hf_split: str = "test"  # the split of an hf: validation_source that holds several
    # "builtin" ("<role>: content\n", EOS closing each assistant turn), a tokenizer_config.json with a Jinja
    # `chat_template`, or hf:<dir> (that directory's tokenizer_config.json)
    chat_template: str = "builtin"
    # an example longer than seq_len + 1 tokens: none = an error; prompt = drop the start of the conversation
    # (the earliest tokens); end = cut the end off
    truncate: str = "none"
    beta: float = 0.1  # DPO: strength of the pull towards the reference model
    label_smoothing: float = 0.0  # DPO (sigmoid loss): assumed share of flipped preference labels (cDPO)
    loss: str = "sigmoid"  # DPO loss: sigmoid (DPO, cDPO with label_smoothing) or ipo
    # DPO: weight of the chosen responses' negative log-likelihood (per token) added to the preference loss
    # (RPO). The preference loss alone leaves the tokens both responses share unanchored, and lowers the
    # likelihood of both; 0: plain DPO
    nll_weight: float = 0.0
    # DPO's reference log-probabilities, from the initial model: cached = computed once before the first step and
    # kept beside the pairs (no weights in memory); frozen = a copy of the initial parameters in the training
    # state, sharded like the policy's, the reference computed in each step (one more forward pass a step)
    reference: str = "cached"

    def __post_init__(self) -> None:
        for key, value, allowed in (("method", self.method, METHODS), ("truncate", self.truncate, TRUNCATE_RULES),
                                    ("loss", self.loss, DPO_LOSSES), ("reference", self.reference, REFERENCES)):
            if value not in allowed:
                raise ConfigError(f"posttrain.{key}={value!r} must be one of {', '.join(allowed)}")
        if self.method != "none" and not self.source:
            raise ConfigError(f"posttrain.method={self.method} needs data: set posttrain.source to a JSONL file "
                              f"or hf:<dataset dir>")
        check_range("posttrain.validation_fraction", self.validation_fraction, 0, 1, high_open=True)
        check_range("posttrain.beta", self.beta, 0, low_open=True)
        check_range("posttrain.label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        check_range("posttrain.nll_weight", self.nll_weight, 0)
        if self.label_smoothing and self.loss == "ipo":
            raise ConfigError("posttrain.label_smoothing applies to the sigmoid loss only; set posttrain.loss="
                              "sigmoid or posttrain.label_smoothing=0")
