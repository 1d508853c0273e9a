"""Hugging Face config.json <-> ModelConfig, for GPT2LMHeadModel and LlamaForCausalLM.

Reads what transformers 4 and 5 write (their rope fields differ: `rope_theta` + `rope_scaling` against
`rope_parameters`) and refuses every option the built-in decoder would compute differently, naming the file
and the field: a silent mismatch would give a model that loads and then computes something else.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxscale.errors import ConfigError
from jaxscale.model.config import ModelConfig, RopeScaling

PREFIX = "hf:"
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # GELU's tanh form, as jaxscale/kernels/gelu.py computes it
# Keys of the model section that config.json decides; the rest (attention, init_std, ...) stay the user's.
SHAPE_KEYS = ("style", "vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps")


def model_directory(spec: str, setting: str) -> Path:
    """The directory an `hf:<dir>` setting (or a plain path) names; it must hold a config.json."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{setting}={spec!r}: give hf:<directory> of a Hugging Face model (config.json and "
                          f"*.safetensors, as save_pretrained writes them)")
    directory = Path(spec.removeprefix(PREFIX)).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{setting}={spec!r}: {directory} is not a directory; give hf:<directory> of a "
                          f"Hugging Face model (config.json and *.safetensors, as save_pretrained writes them)")
    return directory


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a Hugging Face model directory holds config.json beside its "
                          f"weights (save_pretrained writes both)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


class _Fields:
    """Typed access to config.json; every complaint names the file and the field."""

    def __init__(self, raw: dict, path: Path, within: str = ""):
        self.raw, self.path, self.within = raw, path, within  # within: the enclosing field, e.g. "rope_scaling."

    def problem(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.within}{key}={self.raw.get(key)!r} {message}")

    def number(self, key: str, kind=int, default=None):
        value = self.raw.get(key, default)
        if value is None and default is None and key not in self.raw:
            raise ConfigError(f"{self.path}: field {self.within}{key} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise self.problem(key, f"must be {'an integer' if kind is int else 'a number'}")
        if value <= 0:
            raise self.problem(key, "must be positive")
        return kind(value)

    def require(self, key: str, allowed: tuple, default=None, why: str = "") -> None:
        value = self.raw.get(key, default)
        if value not in allowed:
            raise self.problem(key, f"is not supported{why}; jaxscale reads {' or '.join(map(repr, allowed))}")


def architecture(raw: dict, path: Path) -> str:
    names = raw.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if known:
        return ARCHITECTURES[known[0]]
    by_type = {"gpt2": "gpt2", "llama": "llama"}.get(raw.get("model_type"))
    if by_type and not names:
        return by_type
    raise ConfigError(f"{path}: architectures={names!r} (model_type={raw.get('model_type')!r}) is not supported; "
                      f"jaxscale reads {' and '.join(ARCHITECTURES)}")


def model_fields(directory: Path) -> dict:
    """The ModelConfig fields that `directory/config.json` decides, as a model config section."""
    path = directory / "config.json"
    raw = read_config_json(directory)
    f = _Fields(raw, path)
    style = architecture(raw, path)
    if raw.get("sliding_window") is not None or raw.get("use_sliding_window"):
        raise f.problem("sliding_window", "is not supported: jaxscale's attention sees the whole causal context")
    if style == "gpt2":
        d = f.number("n_embd")
        n_inner = raw.get("n_inner")
        f.require("activation_function", GPT2_GELU, "gelu_new")
        f.require("scale_attn_weights", (True,), True)
        f.require("scale_attn_by_inverse_layer_idx", (False,), False)
        f.require("add_cross_attention", (False,), False)
        fields = dict(style="gpt2", vocab_size=f.number("vocab_size"), seq_len=f.number("n_positions"),
                      d_model=d, n_layers=f.number("n_layer"), n_heads=f.number("n_head"), n_kv_heads=f.number("n_head"),
                      d_ff=4 * d if n_inner is None else f.number("n_inner"),
                      tie_embeddings=raw.get("tie_word_embeddings", True) is not False,
                      norm_eps=f.number("layer_norm_epsilon", float, 1e-5), rope_scaling=None)
    else:
        d, heads = f.number("hidden_size"), f.number("num_attention_heads")
        f.require("hidden_act", ("silu",), "silu")
        f.require("attention_bias", (False,), False)
        f.require("mlp_bias", (False,), False)
        if raw.get("head_dim") not in (None, d // heads):
            raise f.problem("head_dim", f"is not supported: jaxscale's head size is hidden_size / "
                                        f"num_attention_heads = {d // heads}")
        kv = raw.get("num_key_value_heads")
        theta, scaling = rope_settings(f)
        fields = dict(style="llama", vocab_size=f.number("vocab_size"),
                      seq_len=f.number("max_position_embeddings"), d_model=d, n_layers=f.number("num_hidden_layers"),
                      n_heads=heads, n_kv_heads=heads if kv is None else f.number("num_key_value_heads"),
                      d_ff=f.number("intermediate_size"), tie_embeddings=raw.get("tie_word_embeddings") is True,
                      rope_theta=theta, rope_scaling=scaling, norm_eps=f.number("rms_norm_eps", float, 1e-6))
    fields["mask_vocab_padding"] = True
    try:
        ModelConfig(**{**fields, "rope_scaling": None if fields["rope_scaling"] is None else
                       RopeScaling(**fields["rope_scaling"])}).resolved()
    except ConfigError as e:
        raise ConfigError(f"{path} describes a model jaxscale cannot build: {e}") from e
    return fields


def rope_settings(f: _Fields) -> tuple[float, dict | None]:
    """rope_theta and the Llama 3 scaling (as a model config section), from either transformers' layout."""
    raw = f.raw
    if isinstance(raw.get("rope_parameters"), dict):  # transformers 5
        key, params = "rope_parameters", dict(raw["rope_parameters"])
    else:  # transformers 4: rope_theta beside rope_scaling (absent or null for plain RoPE)
        key, params = "rope_scaling", dict(raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    g = _Fields(params, f.path, f"{key}.")
    theta = g.number("rope_theta", float)
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{f.path}: {key}.rope_type={rope_type!r} is not supported; jaxscale reads default "
                          f"and llama3 rope")
    scaling = dict(factor=g.number("factor", float), low_freq_factor=g.number("low_freq_factor", float),
                   high_freq_factor=g.number("high_freq_factor", float),
                   original_max_positions=g.number("original_max_position_embeddings"))
    return theta, scaling


def resolve_init_from(section: dict) -> dict:
    """A model config section with `init_from: hf:<dir>` completed from that directory's config.json. A key the
    section sets explicitly must agree, except `seq_len` of a Llama, which may be shorter than its
    max_position_embeddings (the training context; RoPE has no position table)."""
    spec = section["init_from"]
    directory = model_directory(spec, "model.init_from")
    fields = model_fields(directory)
    for key in SHAPE_KEYS:
        if key not in section or section[key] is None or key not in fields:
            continue
        mine, theirs = section[key], fields[key]
        if isinstance(mine, RopeScaling):
            mine = dataclasses.asdict(mine)
        if key == "seq_len" and fields["style"] == "llama" and isinstance(mine, int) and 0 < mine <= theirs:
            continue
        if mine != theirs:
            raise ConfigError(f"model.{key}={mine!r} disagrees with {directory / 'config.json'}, which gives "
                              f"{theirs!r}: with model.init_from the shape comes from config.json; drop "
                              f"model.{key}" + (f" or set it <= {theirs}" if key == "seq_len" and
                                                 fields["style"] == "llama" else ""))
    fields.pop("mask_vocab_padding")
    return {"mask_vocab_padding": True, **fields, **{k: v for k, v in section.items() if v is not None}}


def config_json(cfg: ModelConfig, dtype: str, special_tokens: dict) -> dict:
    """config.json for `cfg`, in the layout transformers 4 writes (transformers 5 reads it too)."""
    if cfg.moe is not None:
        raise ConfigError("a model with model.moe (mixtures of experts) has no Hugging Face export yet; the "
                          "checkpoint itself restores in jaxscale")
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=bool(cfg.tie_embeddings),
                  initializer_range=cfg.init_std, torch_dtype=dtype, **special_tokens)
    if cfg.style == "gpt2":
        if cfg.n_kv_heads != cfg.n_heads:
            raise ConfigError(f"GPT2LMHeadModel has no grouped-query attention, but model.n_kv_heads="
                              f"{cfg.n_kv_heads} < model.n_heads={cfg.n_heads}; export a llama-style model instead")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.seq_len,
                    n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    scaling = cfg.rope_scaling
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
                intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                rope_scaling=None if scaling is None else dict(
                    rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                    high_freq_factor=scaling.high_freq_factor,
                    original_max_position_embeddings=scaling.original_max_positions),
                attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1, **common)


def special_token_ids(raw: dict, vocab_size: int) -> dict:
    """bos/eos/pad token ids of a config.json that fit the vocabulary; others (some checkpoints name ids past
    their vocabulary) are left out."""
    def fits(value):
        values = value if isinstance(value, list) else [value]
        return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size
                                    for v in values)
    return {key: raw[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if fits(raw.get(key))}
