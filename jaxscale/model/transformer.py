"""A decoder-only transformer in Flax NNX: GPT-2 style or Llama style, chosen by `ModelConfig.style`.

The layers' weights are stacked along a leading `layers` axis and the forward pass scans over them, so the
compiled program (and the compile time) is the same size for 2 layers or 96. Every parameter carries the
logical names of its dimensions (Flax's `out_sharding` metadata); `jaxscale.sharding` maps those onto the mesh.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.kernels import attention
from jaxscale.kernels.gelu import bias_gelu
from jaxscale.kernels.norm import norm
from jaxscale.model.config import ModelConfig
from jaxscale.model.embedding import embedding_lookup
from jaxscale.parallel import PipelineConfig, run_layers
from jaxscale.sharding import constrain


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float | None,
          dtype=jnp.float32, **metadata) -> nnx.Param:
    """std=None: ones (norm scales); std=0: zeros (biases); else a normal draw. `axes` names each dimension
    (Flax's `out_sharding` metadata)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, **metadata)


class Blocks(nnx.Module):
    """All transformer layers, each weight stacked over `layers` (dimension 0)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        L, d, H, K, hd, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        std = cfg.init_std
        out_std = std / math.sqrt(2 * L)  # residual projections shrink with depth (GPT-2)
        gpt2 = cfg.style == "gpt2"

        # Every matrix keeps `embed` first (after `layers`), the output projections too: FSDP splits `embed`, and
        # on GPUs a split along the leading dimension is gathered and reduce-scattered in place, where one along
        # the last dimension costs a transpose of each weight and gradient (~2% of a 2-GPU 350M step).
        def p(shape, axes, s):
            return param(rngs, (L, *shape), ("layers", *axes), s, dtype)

        # One fused q/k/v matmul. Heads are grouped by the KV head they share: per KV head, H/K query heads then
        # its key and value. Splitting `kv_heads` over the tensor axis keeps every group on one device.
        qkv = (K, H // K + 2, hd)
        self.attn_norm = p((d,), ("norm",), None)
        self.wqkv = p((d, *qkv), ("embed", "kv_heads", None, "head_dim"), std)
        self.wo = p((d, H, hd), ("embed", "heads", "head_dim"), out_std)
        self.mlp_norm = p((d,), ("norm",), None)
        if gpt2:
            self.attn_norm_bias = p((d,), ("norm",), 0)
            self.mlp_norm_bias = p((d,), ("norm",), 0)
            self.bqkv = p(qkv, ("kv_heads", None, "head_dim"), 0)
            self.bo = p((d,), ("norm",), 0)
            self.w_in = p((d, F), ("embed", "mlp"), std)
            self.b_in = p((F,), ("mlp",), 0)
            self.w_out = p((d, F), ("embed", "mlp"), out_std)
            self.b_out = p((d,), ("norm",), 0)
        else:
            self.w_gate = p((d, F), ("embed", "mlp"), std)
            self.w_up = p((d, F), ("embed", "mlp"), std)
            self.w_down = p((d, F), ("embed", "mlp"), out_std)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """The rotation speed of each pair of head dimensions, scaled as Llama 3 does when cfg.rope_scaling says."""
    half = cfg.head_dim // 2
    freqs = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    s = cfg.rope_scaling
    if s is None:
        return freqs
    wavelength = 2 * math.pi / freqs
    blend = (s.original_max_positions / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    between = (1 - blend) * freqs / s.factor + blend * freqs
    return jnp.where(wavelength > s.original_max_positions / s.low_freq_factor, freqs / s.factor,
                     jnp.where(wavelength < s.original_max_positions / s.high_freq_factor, freqs, between))


def rope(x, positions, freqs):
    """Rotary position embedding over the last (head) dimension, halves rotated as in Llama."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * freqs  # (batch, length, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def layer(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, positions, segment_ids, dtype) -> jax.Array:
    """One transformer layer; `p` holds this layer's slice of every stacked weight."""
    gpt2 = cfg.style == "gpt2"
    w = {k: v.astype(dtype) for k, v in p.items() if not k.endswith("norm") and not k.endswith("norm_bias")}
    bias = (lambda name: w[name]) if gpt2 else (lambda name: 0)

    h = norm(x, p["attn_norm"], p.get("attn_norm_bias"), cfg.norm_eps)
    qkv = jnp.einsum("btd,dkgh->btkgh", h, w["wqkv"]) + bias("bqkv")
    # checkpoint names: the save points of train.remat=save:NAMES / offload:NAMES (jaxscale.remat.SAVE_POINTS)
    qkv = checkpoint_name(constrain(qkv, ("batch", "length", "kv_heads", None, "head_dim")), "qkv")
    b, t, n_kv, groups, hd = qkv.shape
    q = qkv[:, :, :, :-2].reshape(b, t, n_kv * (groups - 2), hd)  # query head i uses KV head i // (H / K)
    k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    if not gpt2:
        freqs = rope_frequencies(cfg)
        q, k = rope(q, positions, freqs), rope(k, positions, freqs)
    y = attention(q, k, v, segment_ids, causal=True, implementation=cfg.attention)  # within each document
    y = checkpoint_name(constrain(y, ("batch", "length", "heads", "head_dim")), "attention_out")
    x = x + jnp.einsum("btnh,dnh->btd", y, w["wo"]) + bias("bo")
    x = constrain(x, ("batch", "length", "embed"))

    h = norm(x, p["mlp_norm"], p.get("mlp_norm_bias"), cfg.norm_eps)
    if gpt2:
        hidden = bias_gelu(jnp.einsum("btd,df->btf", h, w["w_in"]), w["b_in"])
    else:
        hidden = jax.nn.silu(jnp.einsum("btd,df->btf", h, w["w_gate"])) * jnp.einsum("btd,df->btf", h, w["w_up"])
    hidden = checkpoint_name(constrain(hidden, ("batch", "length", "mlp")), "mlp_hidden")
    x = x + jnp.einsum("btf,df->btd", hidden, w["w_out" if gpt2 else "w_down"]) + bias("b_out")
    return constrain(x, ("batch", "length", "embed"))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, decay_embeddings: bool = False):
        self.cfg = cfg
        d, V = cfg.d_model, cfg.padded_vocab
        table = dict(weight_decay=decay_embeddings)  # lookup tables: by default no decay, as in GPT-2 / nanoGPT
        self.embed = param(rngs, (V, d), ("vocab", "embed"), cfg.init_std, param_dtype, **table)
        if cfg.style == "gpt2":
            self.positions = param(rngs, (cfg.seq_len, d), ("position", "embed"), cfg.init_std / 2, param_dtype,
                                   **table)
        self.blocks = Blocks(cfg, rngs, param_dtype)
        self.final_norm = param(rngs, (d,), ("norm",), None, param_dtype)
        if cfg.style == "gpt2":
            self.final_norm_bias = param(rngs, (d,), ("norm",), 0, param_dtype)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (d, V), ("embed", "vocab"), cfg.init_std, param_dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
                 compute_dtype=jnp.float32, remat: str = "none", scan_unroll: int = 1,
                 pipeline: PipelineConfig | None = None) -> jax.Array:
        """tokens (batch, length) int -> logits (batch, length, padded vocab) in `compute_dtype`.

        `scan_unroll` layers run per scan iteration: 1 keeps compile time flat in depth, n_layers removes the
        loop's stacking copies (faster on GPUs, longer compiles). Under a mesh whose `pipeline` axis is > 1
        the layers run as pipeline stages instead (`jaxscale.parallel`), scheduled by `pipeline`."""
        cfg = self.cfg
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = embedding_lookup(self.embed[...].astype(compute_dtype), tokens)
        if cfg.style == "gpt2":
            # A lookup rather than a broadcast add: the add's gradient is a sum over the batch, for which XLA on
            # GPUs lays the whole residual stream out batch-minor, a transpose in every residual add and norm.
            x = x + embedding_lookup(self.positions[...].astype(compute_dtype), positions)
        x = constrain(x, ("batch", "length", "embed"))

        def apply_layer(x, layer_params, segment_ids):  # x: the whole batch, or one pipeline microbatch
            return layer(cfg, layer_params, x, positions[:x.shape[0]], segment_ids, compute_dtype)

        x = run_layers(apply_layer, self.blocks.stacked(), x, segment_ids, remat=remat, unroll=scan_unroll,
                       settings=pipeline)

        final_bias = self.final_norm_bias[...] if cfg.style == "gpt2" else None
        x = norm(x, self.final_norm[...], final_bias, cfg.norm_eps)
        head = self.embed[...].T if cfg.tie_embeddings else self.head[...]
        logits = jnp.einsum("btd,dv->btv", x, head.astype(compute_dtype))
        if cfg.mask_vocab_padding and cfg.padded_vocab > cfg.vocab_size:
            padding = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) >= cfg.vocab_size
            logits = jnp.where(padding, jnp.finfo(logits.dtype).min, logits)
        return constrain(logits, ("batch", "length", "vocab"))
