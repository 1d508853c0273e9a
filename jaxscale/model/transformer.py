"""A decoder-only transformer in Flax NNX: GPT-2 style or Llama style, chosen by `ModelConfig.style`.

The layers' weights are stacked along a leading `layers` axis and the forward pass scans over them, so the
compiled program (and the compile time) is the same size for 2 layers or 96. Every parameter carries the
logical names of its dimensions (Flax's `out_sharding` metadata); `jaxscale.sharding` maps those onto the mesh.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.kernels import attention
from jaxscale.kernels.cross_entropy import cross_entropy
from jaxscale.kernels.fp8 import matmul
from jaxscale.kernels.gelu import bias_gelu
from jaxscale.kernels.norm import norm
from jaxscale.model.config import ModelConfig
from jaxscale.model.embedding import embedding_lookup
from jaxscale.model.moe import (
    SHARED_WEIGHTS,
    add_layer_stats,
    layer_means,
    moe_mlp,
    moe_weights,
    no_stats,
    steer_biases,
)
from jaxscale.parallel import PipelineConfig, run_layers, run_layers_and_loss
from jaxscale.parallel.context import balanced_order, context_attention, context_ranks
from jaxscale.parallel.experts import EXPERT_WEIGHTS
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


DENSE_MLP_WEIGHTS = ("w_in", "b_in", "w_out", "b_out", "w_gate", "w_up", "w_down")
OUTPUT_WEIGHTS = ("expert_out", "expert_down")  # scaled down with depth, as the dense w_out / w_down
GROUP_SLOT = "group_slot"  # not a weight: travels with a mixture of experts' layer groups (Transformer.forward)


class Blocks(nnx.Module):
    """All transformer layers, each weight stacked over `layers` (dimension 0)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        L, d, H, K, hd, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        std = cfg.init_std
        out_std = std / math.sqrt(2 * L)  # residual projections shrink with depth (GPT-2)
        gpt2 = cfg.style == "gpt2"
        dense = L - cfg.moe_layers  # layers with the dense MLP; the others have experts (cfg.moe)

        # Every matrix keeps `embed` first (after `layers`), the output projections too: FSDP splits `embed`, and
        # on GPUs a split along the leading dimension is gathered and reduce-scattered in place, where one along
        # the last dimension costs a transpose of each weight and gradient (~2% of a 2-GPU 350M step).
        def p(shape, axes, s, count=L, **metadata):
            return param(rngs, (count, *shape), ("layers", *axes), s, dtype, **metadata)

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
        if dense and gpt2:
            self.w_in = p((d, F), ("embed", "mlp"), std, dense)
            self.b_in = p((F,), ("mlp",), 0, dense)
            self.w_out = p((d, F), ("embed", "mlp"), out_std, dense)
            self.b_out = p((d,), ("norm",), 0, dense)
        elif dense:
            self.w_gate = p((d, F), ("embed", "mlp"), std, dense)
            self.w_up = p((d, F), ("embed", "mlp"), std, dense)
            self.w_down = p((d, F), ("embed", "mlp"), out_std, dense)
        if cfg.moe is not None:
            m, count = cfg.moe, cfg.moe_layers
            self.router = p((d, m.experts), ("embed", None), std, count)
            # moved by the load, not by gradients (jaxscale.model.moe): no weight decay, its own update rule
            self.router_bias = p((m.experts,), (None,), 0, count, weight_decay=False, balance_bias=True)
            for name in EXPERT_WEIGHTS[cfg.style]:
                setattr(self, name, p((m.experts, d, m.d_ff), ("expert", "embed", "mlp"),
                                      out_std if name in OUTPUT_WEIGHTS else std, count))
            if m.shared_experts:
                for name, dense_name in zip(SHARED_WEIGHTS[cfg.style], EXPERT_WEIGHTS[cfg.style]):
                    setattr(self, name, p((d, m.shared_experts * m.d_ff), ("embed", "mlp"),
                                          out_std if dense_name in OUTPUT_WEIGHTS else std, count))

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


def cast(p: dict[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """The weights in the compute dtype; norm scales and biases stay as they are (norm() works in float32)."""
    return {k: v.astype(dtype) for k, v in p.items() if not k.endswith("norm") and not k.endswith("norm_bias")}


def attention_half(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, positions, segment_ids,
                   dtype, matmul_dtype: str = "compute") -> jax.Array:
    """x plus the attention of one layer; `p` holds this layer's slice of every stacked weight. `matmul_dtype`:
    that of the projections (jaxscale.kernels.fp8.matmul)."""
    gpt2 = cfg.style == "gpt2"
    w = cast(p, dtype)
    bias = (lambda name: w[name]) if gpt2 else (lambda name: 0)

    h = norm(x, p["attn_norm"], p.get("attn_norm_bias"), cfg.norm_eps)
    qkv = matmul("btd,dkgh->btkgh", h, w["wqkv"], matmul_dtype) + bias("bqkv")
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
    if context_ranks() > 1:  # the sequence split over the context axis, in balanced_order
        y = context_attention(q, k, v, positions, segment_ids, cfg.context_attention)
    else:
        y = attention(q, k, v, segment_ids, causal=True, implementation=cfg.attention)  # within each document
    y = checkpoint_name(constrain(y, ("batch", "length", "heads", "head_dim")), "attention_out")
    x = x + matmul("btnh,dnh->btd", y, w["wo"], matmul_dtype) + bias("bo")
    return constrain(x, ("batch", "length", "embed"))


def mlp_input(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return norm(x, p["mlp_norm"], p.get("mlp_norm_bias"), cfg.norm_eps)


def dense_mlp(cfg: ModelConfig, w: dict[str, jax.Array], h: jax.Array, matmul_dtype: str = "compute") -> jax.Array:
    """The dense feed-forward part's output for its input h (batch, length, embed); `w` in the compute dtype."""
    def mm(spec, a, name):
        return matmul(spec, a, w[name], matmul_dtype)

    if cfg.style == "gpt2":
        hidden = bias_gelu(mm("btd,df->btf", h, "w_in"), w["b_in"])
    else:
        hidden = jax.nn.silu(mm("btd,df->btf", h, "w_gate")) * mm("btd,df->btf", h, "w_up")
    hidden = checkpoint_name(constrain(hidden, ("batch", "length", "mlp")), "mlp_hidden")
    return mm("btf,df->btd", hidden, "w_out" if cfg.style == "gpt2" else "w_down")


def layer(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, positions, segment_ids, dtype,
          matmul_dtype: str = "compute") -> jax.Array:
    """One transformer layer; `p` holds this layer's slice of every stacked weight."""
    x = attention_half(cfg, p, x, positions, segment_ids, dtype, matmul_dtype)
    w = cast(p, dtype)
    x = x + dense_mlp(cfg, w, mlp_input(cfg, p, x), matmul_dtype) + w.get("b_out", 0)
    return constrain(x, ("batch", "length", "embed"))


def layer_group(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, positions, segment_ids, dtype,
                matmul_dtype: str = "compute") -> tuple[jax.Array, dict]:
    """cfg.moe.every layers, the last of them with experts: (x after them, the routing statistics of their
    mixture-of-experts layer). `p` holds the group's slice of every stack: per-layer weights (every, ...),
    dense MLPs (every - 1, ...) and the experts' (1, ...)."""
    every, own = cfg.moe.every, moe_weights(cfg.style)
    per_layer = {k: v for k, v in p.items() if k not in own and k not in DENSE_MLP_WEIGHTS}
    for j in range(every):
        lp = {k: v[j] for k, v in per_layer.items()}
        x = attention_half(cfg, lp, x, positions, segment_ids, dtype, matmul_dtype)
        h = mlp_input(cfg, lp, x)
        if j < every - 1:
            w = cast({k: v[j] for k, v in p.items() if k in DENSE_MLP_WEIGHTS}, dtype)
            x = x + dense_mlp(cfg, w, h, matmul_dtype) + w.get("b_out", 0)
        else:
            y, stats = moe_mlp(cfg, {k: v[0] for k, v in p.items() if k in own}, h, dtype)
            x = x + y
        x = constrain(x, ("batch", "length", "embed"))
    return x, stats


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
                 pipeline: PipelineConfig | None = None, matmul_dtype: str = "compute") -> jax.Array:
        """tokens (batch, length) int -> logits (batch, length, padded vocab) in `compute_dtype`.

        `scan_unroll` layers run per scan iteration: 1 keeps compile time flat in depth, n_layers removes the
        loop's stacking copies (faster on GPUs, longer compiles). Under a mesh whose `pipeline` axis is > 1
        the layers run as pipeline stages instead (`jaxscale.parallel`), scheduled by `pipeline` (the run's
        `config.pipeline`, needed there). `matmul_dtype`: that of the layers' projections and dense MLPs,
        compute or fp8 (`jaxscale.kernels.fp8`)."""
        return self.forward(tokens, segment_ids, compute_dtype=compute_dtype, remat=remat, scan_unroll=scan_unroll,
                            pipeline=pipeline, matmul_dtype=matmul_dtype)[0]

    def forward(self, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
                compute_dtype=jnp.float32, remat: str = "none", scan_unroll: int = 1,
                pipeline: PipelineConfig | None = None,
                matmul_dtype: str = "compute") -> tuple[jax.Array, dict | None]:
        """(logits as `__call__` gives them, the routing statistics averaged over the mixture-of-experts layers
        (`jaxscale.model.moe`), or None for a dense model)."""
        cfg = self.cfg
        x, segment_ids, positions, order = self.embedded(tokens, segment_ids, compute_dtype)
        stack, stats = self.blocks.stacked(), None
        if cfg.moe is None:
            x = run_layers(layer_fn(cfg, positions, compute_dtype, matmul_dtype), stack, x, segment_ids,
                           remat=remat, unroll=scan_unroll, settings=pipeline)
        else:  # the scan (or pipeline) runs over groups of moe.every layers, carrying the routing totals
            x, totals = run_layers(group_fn(cfg, positions, compute_dtype, matmul_dtype), grouped_stack(cfg, stack),
                                   (x, no_stats(cfg.moe, cfg.moe_layers)), segment_ids, remat=remat,
                                   unroll=scan_unroll, settings=pipeline)
            x = steer_biases(cfg.moe, x, stack["router_bias"], totals)
            stats = layer_means(totals, cfg.moe)
        return output_logits(cfg, self.head_weights(), x, order, compute_dtype), stats

    def next_token_loss(self, tokens: jax.Array, targets: jax.Array, segment_ids: jax.Array | None = None, *,
                        compute_dtype=jnp.float32, remat: str = "none", scan_unroll: int = 1,
                        pipeline: PipelineConfig | None = None, matmul_dtype: str = "compute") -> jax.Array:
        """The mean cross entropy of `targets` (batch, length) given `tokens`, for a dense model. The layers,
        output head and loss run through `run_layers_and_loss`, so a 1F1B pipeline schedule takes each
        microbatch's loss inside it."""
        if self.cfg.moe is not None:
            raise ValueError("next_token_loss is for dense models; a mixture of experts also returns routing "
                             "statistics: use forward")
        cfg = self.cfg
        x, segment_ids, positions, order = self.embedded(tokens, segment_ids, compute_dtype)

        def head_loss(head, y, targets):
            return cross_entropy(output_logits(cfg, head, y, order, compute_dtype), targets)

        return run_layers_and_loss(layer_fn(cfg, positions, compute_dtype, matmul_dtype), self.blocks.stacked(), x,
                                   segment_ids, head_loss, self.head_weights(), targets, remat=remat,
                                   unroll=scan_unroll, settings=pipeline)

    def embedded(self, tokens: jax.Array, segment_ids: jax.Array | None, compute_dtype):
        """(the embedded tokens, the segment ids, the tokens' positions (length,), the balanced order of the
        sequence over the context ranks or None): everything before the layers. With a context axis the
        tokens are taken in balanced order (each context rank gets an early and a late chunk: equal causal
        work)."""
        cfg = self.cfg
        b, t = tokens.shape
        ranks = context_ranks()
        order = balanced_order(t, ranks) if ranks > 1 else None
        if order is not None:
            tokens = tokens[:, order]
            segment_ids = None if segment_ids is None else segment_ids[:, order]
        positions = jnp.arange(t) if order is None else jnp.asarray(order)
        x = embedding_lookup(self.embed[...].astype(compute_dtype), tokens)
        if cfg.style == "gpt2":
            # A lookup rather than a broadcast add: the add's gradient is a sum over the batch, for which XLA on
            # GPUs lays the whole residual stream out batch-minor, a transpose in every residual add and norm.
            rows = jnp.broadcast_to(positions, (b, t))
            x = x + embedding_lookup(self.positions[...].astype(compute_dtype), rows)
        return constrain(x, ("batch", "length", "embed")), segment_ids, positions, order

    def head_weights(self) -> dict[str, jax.Array]:
        """The weights after the layers: the final norm's and the output projection (the embedding if tied)."""
        head = {"final_norm": self.final_norm[...],
                "output": self.embed[...].T if self.cfg.tie_embeddings else self.head[...]}
        if self.cfg.style == "gpt2":
            head["final_norm_bias"] = self.final_norm_bias[...]
        return head


def layer_fn(cfg: ModelConfig, positions: jax.Array, dtype, matmul_dtype: str = "compute"):
    """The layer function `run_layers` takes: one layer on the whole batch, or on one pipeline microbatch.
    `positions` (length,) are broadcast over x's rows, not sliced from a batch-sized array, whose rows may
    lie on other devices."""

    def apply_layer(x, layer_params, segment_ids):
        return layer(cfg, layer_params, x, jnp.broadcast_to(positions, x.shape[:2]), segment_ids, dtype,
                     matmul_dtype)

    return apply_layer


def grouped_stack(cfg: ModelConfig, stack: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A mixture of experts' stacked weights as groups of moe.every layers (every stack splits evenly into
    them), with each group's place among them (GROUP_SLOT, one-hot): where its statistics go in the totals."""
    groups = cfg.moe_layers
    grouped = {k: v.reshape(groups, v.shape[0] // groups, *v.shape[1:]) for k, v in stack.items()}
    return {**grouped, GROUP_SLOT: jnp.eye(groups, dtype=jnp.float32)}


def group_fn(cfg: ModelConfig, positions: jax.Array, dtype, matmul_dtype: str = "compute"):
    """The layer function `run_layers` takes for a mixture of experts: one group of `grouped_stack` on the
    carry (x, routing totals (`jaxscale.model.moe.no_stats`)), whose totals get the group's statistics."""

    def apply_group(carry, group_params, segment_ids):
        x, totals = carry
        weights = {k: v for k, v in group_params.items() if k != GROUP_SLOT}
        rows = jnp.broadcast_to(positions, x.shape[:2])
        x, layer_stats = layer_group(cfg, weights, x, rows, segment_ids, dtype, matmul_dtype)
        return x, add_layer_stats(totals, layer_stats, group_params[GROUP_SLOT])

    return apply_group


def output_logits(cfg: ModelConfig, head: dict[str, jax.Array], x: jax.Array, order, compute_dtype) -> jax.Array:
    """The last layer's output x (batch, length, embed) -> logits (batch, length, padded vocab); `order`: the
    balanced order x's sequence is in (context parallelism), or None."""
    if order is not None:  # back to the sequence's order for the output head
        x = constrain(x[:, np.argsort(order)], ("batch", "length", "embed"))
    x = norm(x, head["final_norm"], head.get("final_norm_bias"), cfg.norm_eps)
    logits = jnp.einsum("btd,dv->btv", x, head["output"].astype(compute_dtype))
    if cfg.mask_vocab_padding and cfg.padded_vocab > cfg.vocab_size:
        padding = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) >= cfg.vocab_size
        logits = jnp.where(padding, jnp.finfo(logits.dtype).min, logits)
    return constrain(logits, ("batch", "length", "vocab"))
