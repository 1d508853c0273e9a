"""Model hyperparameters, the size presets, and the FLOP count used for MFU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxscale.errors import ConfigError, check_range
from jaxscale.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jaxscale.parallel.moe_config import MoEConfig

CONTEXT_ATTENTION = ("allgather", "ring")  # jaxscale.parallel.context.IMPLEMENTATIONS, without importing it


@dataclass
class RopeScaling:
    """Llama 3's rope scaling (transformers' rope_type "llama3"): frequencies whose wavelength exceeds
    original_max_positions / low_freq_factor turn `factor` times slower, those below original_max_positions /
    high_freq_factor stay, and the ones between blend the two."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass
class ModelConfig:
    style: str = "gpt2"  # gpt2: learned positions, LayerNorm, GELU, tied head | llama: RoPE, RMSNorm, SwiGLU, GQA
    vocab_size: int = 257  # tokenizer's (the bytes tokenizer: 256 bytes + end of document); padded to a multiple of 128
    seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouping)
    d_ff: int | None = None  # None: 4 x d_model (gpt2) or the SwiGLU size 8/3 x d_model rounded to 256 (llama)
    tie_embeddings: bool | None = None  # None: True for gpt2, False for llama
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # llama only; None: plain RoPE
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "auto"  # auto | cudnn | xla | pallas: jaxscale.kernels.attention says what each runs
    # With mesh.context > 1: ring (the keys go round the ranks) | allgather (every rank gathers the sequence's
    # keys); jaxscale.parallel.context says what each costs
    context_attention: str = "ring"
    # Logits of the padding ids past vocab_size are the dtype's lowest value, so the softmax covers the real
    # vocabulary only (imported models: their loss is the original's). Off, padding ids are learned away.
    mask_vocab_padding: bool = False
    # "hf:<dir>": start from a Hugging Face checkpoint, the shape from its config.json; "run:<dir>": from the
    # parameters of a jaxscale run's newest finished checkpoint, the shape from its config.yaml
    init_from: str = ""
    moe: MoEConfig | None = None  # None: dense feed-forward layers; else mixtures of experts (jaxscale.model.moe)

    def __post_init__(self):
        if self.style not in ("gpt2", "llama"):
            raise ConfigError(f"model.style={self.style!r}; choose gpt2 or llama")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"model.attention={self.attention!r}; choose {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ConfigError(f"model.context_attention={self.context_attention!r}; choose "
                              f"{' or '.join(CONTEXT_ATTENTION)}")
        if self.init_from and not self.init_from.startswith(("hf:", "run:")):
            raise ConfigError(f"model.init_from={self.init_from!r}; give hf:<directory of a Hugging Face model> or "
                              f"run:<run_dir of a jaxscale run>")
        for key in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, key)
            if value is not None:  # n_kv_heads, d_ff: None means the default; 0 is a mistake
                check_range(f"model.{key}", value, 1,
                            note=" (or null for the default)" if key in ("n_kv_heads", "d_ff") else "")
        for key in ("rope_theta", "norm_eps", "init_std"):
            check_range(f"model.{key}", getattr(self, key), 0, low_open=True)

    def resolved(self) -> ModelConfig:
        """Fill the None defaults, check the combination."""
        cfg = self
        n_kv = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
        if cfg.d_model % cfg.n_heads:
            raise ConfigError(f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
        if cfg.n_heads % n_kv:
            raise ConfigError(f"model.n_heads={cfg.n_heads} must be a multiple of model.n_kv_heads={n_kv}")
        if cfg.style == "llama" and (cfg.d_model // cfg.n_heads) % 2:
            raise ConfigError("RoPE needs an even head size: d_model / n_heads must be even")
        scaling = cfg.rope_scaling
        if scaling is not None:
            if cfg.style != "llama":
                raise ConfigError("model.rope_scaling applies to RoPE: set model.style=llama or drop it")
            if not (scaling.factor > 0 and 0 < scaling.low_freq_factor < scaling.high_freq_factor
                    and scaling.original_max_positions > 0):
                raise ConfigError(f"model.rope_scaling={scaling}: needs factor > 0, 0 < low_freq_factor < "
                                  f"high_freq_factor and original_max_positions > 0")
        d_ff = cfg.d_ff if cfg.d_ff is not None else (
            4 * cfg.d_model if cfg.style == "gpt2" else 256 * -(-8 * cfg.d_model // 3 // 256))
        tie = cfg.tie_embeddings if cfg.tie_embeddings is not None else cfg.style == "gpt2"
        moe = cfg.moe
        if moe is not None:
            moe.check_layers(cfg.n_layers)
            moe = dataclasses.replace(moe, d_ff=moe.d_ff or d_ff)
        return dataclasses.replace(cfg, n_kv_heads=n_kv, d_ff=d_ff, tie_embeddings=tie, moe=moe)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        values = {**preset_values(name), **overrides}
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        return cls(**values).resolved()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def moe_layers(self) -> int:
        return self.n_layers // self.moe.every if self.moe else 0

    @property
    def staged_layers(self) -> int:
        """The units a pipeline deals out to its stages: layers, or with a mixture of experts the groups of
        moe.every layers that end in one with experts (the layer stack is scanned over those)."""
        return self.moe_layers if self.moe else self.n_layers

    def _mlp(self, width: int) -> int:
        return (3 if self.style == "llama" else 2) * self.d_model * width

    def expert_params(self, experts: int) -> int:
        """The matmul weights of one mixture-of-experts layer's feed-forward part with `experts` of its routed
        experts: those, the shared experts and the router."""
        m = self.moe
        return (experts + m.shared_experts) * self._mlp(m.d_ff) + self.d_model * m.experts

    def matmul_params(self) -> int:
        """N in FLOPs/token = 6N + 12 L d T: the weights of every matmul a token passes through, the output head
        included. With mixtures of experts, those of its top_k experts (the active parameters)."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o and k, v
        dense = self.n_layers - self.moe_layers
        moe = self.moe_layers * self.expert_params(self.moe.top_k) if self.moe else 0
        return self.n_layers * attn + dense * self._mlp(self.d_ff) + moe + self.padded_vocab * d

    def total_params(self) -> int:
        d = self.d_model
        norms_per_layer = 2 * d * (2 if self.style == "gpt2" else 1)
        biases_per_layer = (self.n_heads * self.head_dim + 2 * self.n_kv_heads * self.head_dim + d + self.d_ff + d
                            if self.style == "gpt2" else 0)
        positions = self.seq_len * d if self.style == "gpt2" else 0
        embed = 0 if self.tie_embeddings else self.padded_vocab * d  # untied: the input table is extra
        final_norm = d * (2 if self.style == "gpt2" else 1)
        # the experts no token of a layer passes through and the router biases are parameters too; the MoE
        # layers have no dense MLP biases
        idle = self.moe_layers * (self.expert_params(self.moe.experts) - self.expert_params(self.moe.top_k)
                                  + self.moe.experts - (self.d_ff + d if self.style == "gpt2" else 0)
                                  ) if self.moe else 0
        return (self.matmul_params() + idle + embed + positions + final_norm
                + self.n_layers * (norms_per_layer + biases_per_layer))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) + 12 L d T for attention scores."""
        return 6 * self.matmul_params() + 12 * self.n_layers * self.d_model * self.seq_len


_GPT2 = dict(style="gpt2", vocab_size=50257, seq_len=1024)
_LLAMA = dict(style="llama", vocab_size=128256, seq_len=2048, rope_theta=500000.0)
PRESETS: dict[str, dict] = {
    "tiny": dict(style="gpt2", vocab_size=257, seq_len=128, d_model=64, n_layers=2, n_heads=4),
    "tiny-llama": dict(style="llama", vocab_size=257, seq_len=128, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, d_ff=128),
    "gpt2-124m": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-350m": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-774m": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-1.5b": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25),
    "llama-1b": dict(_LLAMA, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192),
    "llama-8b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    # The published shapes, so that their Hugging Face weights load into them (hf:<dir> checks the shapes).
    "llama-3.2-1b": dict(_LLAMA, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                         tie_embeddings=True, rope_scaling=dict(factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192,
                         tie_embeddings=True, rope_scaling=dict(factor=32.0)),
    "llama-3-8b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
}


def preset_values(name: str) -> dict:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return {key: dict(value) if isinstance(value, dict) else value for key, value in PRESETS[name].items()}
