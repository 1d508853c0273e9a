"""Where each Hugging Face tensor lives in jaxscale's parameter tree, written once for both directions.

A `Placement` says: the HF tensor `name`, reshaped by splitting one dimension (`split`) and transposed
(`perm`), is the region `index` of the jaxscale parameter `param`. Import pulls any block of a parameter (one
device's shard) back to the HF slices it needs; export gathers each region and undoes the two steps. Every
mapping is a reshape and a transpose, so a round trip is exact.

The layouts: jaxscale stacks layers along a leading dimension; keeps `embed` first in every matrix; fuses q, k
and v into wqkv (d, K, H/K + 2, hd), grouped by KV head (H/K query heads, then its key, then its value); pads
the vocabulary to a multiple of 128. GPT-2's Conv1D stores (in, out), its c_attn is [q | k | v] along `out`;
torch Linear (Llama) stores (out, in). Both order query heads so that head i uses KV head i // (H/K), as
jaxscale does, and rotate halves in RoPE, as jaxscale does, so no head is permuted.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxscale.model.config import ModelConfig

Index = tuple  # per parameter dimension: an int (that one entry; the dimension is dropped) or a slice
ALL = slice(None)


@dataclass(frozen=True)
class Placement:
    name: str  # tensor name in the HF checkpoint
    param: tuple[str, ...]  # path in jaxscale's parameter dict
    index: Index  # the region of the parameter this tensor fills
    split: tuple[int, tuple[int, ...]] | None = None  # (HF dimension, the sizes it splits into)
    perm: tuple[int, ...] | None = None  # transpose after the split

    def region_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(len(range(*sel.indices(size))) for sel, size in zip(self.index, param_shape)
                     if isinstance(sel, slice))

    def hf_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the HF tensor must have to fill its region of a parameter of `param_shape`."""
        return _undo_split(self, _undo_perm(self, self.region_shape(param_shape)))

    def to_hf(self, region: np.ndarray) -> np.ndarray:
        """The region of the parameter (export) as the HF tensor."""
        if self.perm is not None:
            region = region.transpose(np.argsort(self.perm))
        return region.reshape(_undo_split(self, region.shape))

    def read(self, load: Callable[[tuple[slice, ...]], np.ndarray], ranges: list[tuple[int, int]]) -> np.ndarray:
        """The block `ranges` (start, stop per region dimension) of the region, from `load(hf slices)`."""
        inner = [None] * len(ranges)  # ranges in the split (not yet transposed) layout
        for j, r in enumerate(ranges):
            inner[self.perm[j] if self.perm is not None else j] = r
        if self.split is None:
            block = load(tuple(slice(*r) for r in inner))
        else:
            # Whole rows of the split's first part are read (about one tensor at most), the rest sliced here.
            axis, sizes = self.split
            width = math.prod(sizes[1:])
            first = inner[axis]
            hf = [slice(*r) for r in inner[:axis]] + [slice(first[0] * width, first[1] * width)] + \
                 [slice(*r) for r in inner[axis + len(sizes):]]
            block = load(tuple(hf))
            block = block.reshape(block.shape[:axis] + (first[1] - first[0], *sizes[1:]) + block.shape[axis + 1:])
            block = block[(ALL,) * (axis + 1) + tuple(slice(*r) for r in inner[axis + 1:axis + len(sizes)])]
        return block if self.perm is None else block.transpose(self.perm)


def _undo_perm(p: Placement, shape: tuple[int, ...]) -> tuple[int, ...]:
    if p.perm is None:
        return tuple(shape)
    inner = [0] * len(shape)
    for j, size in enumerate(shape):
        inner[p.perm[j]] = size
    return tuple(inner)


def _undo_split(p: Placement, shape: tuple[int, ...]) -> tuple[int, ...]:
    if p.split is None:
        return tuple(shape)
    axis, sizes = p.split
    return shape[:axis] + (math.prod(shape[axis:axis + len(sizes)]),) + shape[axis + len(sizes):]


def placements(cfg: ModelConfig, gpt2_prefix: str = "transformer.") -> list[Placement]:
    """Every HF tensor of a model shaped as `cfg`, in the order transformers writes them.
    `gpt2_prefix`: "transformer." (GPT2LMHeadModel) or "" (checkpoints of the bare GPT2Model)."""
    return _gpt2(cfg, gpt2_prefix) if cfg.style == "gpt2" else _llama(cfg)


def _embedding(cfg: ModelConfig, name: str) -> Placement:
    return Placement(name, ("embed",), (slice(0, cfg.vocab_size), ALL))  # the padding past vocab_size stays zero


def _head(cfg: ModelConfig) -> list[Placement]:
    """The output head: none when tied to the embedding (transformers then writes no lm_head)."""
    return [] if cfg.tie_embeddings else [
        Placement("lm_head.weight", ("head",), (ALL, slice(0, cfg.vocab_size)), perm=(1, 0))]


def _llama(cfg: ModelConfig) -> list[Placement]:
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // K  # query heads per KV head

    def layer(i: int) -> list[Placement]:
        at = f"model.layers.{i}."

        def qkv(name, groups, count):  # (count x K x hd, d) -> (d, K, count, hd) at groups of wqkv
            return Placement(at + f"self_attn.{name}.weight", ("blocks", "wqkv"), (i, ALL, ALL, groups, ALL),
                             split=(0, (K, count, hd)), perm=(3, 0, 1, 2))

        return [
            Placement(at + "input_layernorm.weight", ("blocks", "attn_norm"), (i, ALL)),
            qkv("q_proj", slice(0, G), G), qkv("k_proj", slice(G, G + 1), 1), qkv("v_proj", slice(G + 1, G + 2), 1),
            Placement(at + "self_attn.o_proj.weight", ("blocks", "wo"), (i, ALL, ALL, ALL), split=(1, (H, hd))),
            Placement(at + "post_attention_layernorm.weight", ("blocks", "mlp_norm"), (i, ALL)),
            Placement(at + "mlp.gate_proj.weight", ("blocks", "w_gate"), (i, ALL, ALL), perm=(1, 0)),
            Placement(at + "mlp.up_proj.weight", ("blocks", "w_up"), (i, ALL, ALL), perm=(1, 0)),
            Placement(at + "mlp.down_proj.weight", ("blocks", "w_down"), (i, ALL, ALL)),
        ]

    return ([_embedding(cfg, "model.embed_tokens.weight")] + [p for i in range(cfg.n_layers) for p in layer(i)]
            + [Placement("model.norm.weight", ("final_norm",), (ALL,))] + _head(cfg))


def _gpt2(cfg: ModelConfig, prefix: str) -> list[Placement]:
    H, hd = cfg.n_heads, cfg.head_dim

    def layer(i: int) -> list[Placement]:
        at = f"{prefix}h.{i}."

        def vector(name, param):
            return Placement(at + name, ("blocks", param), (i, ALL))

        return [
            vector("ln_1.weight", "attn_norm"), vector("ln_1.bias", "attn_norm_bias"),
            # c_attn (d, [q | k | v]) -> (d, 3, H, hd) -> (d, H, 3, hd): one KV group per head
            Placement(at + "attn.c_attn.weight", ("blocks", "wqkv"), (i, ALL, ALL, ALL, ALL),
                      split=(1, (3, H, hd)), perm=(0, 2, 1, 3)),
            Placement(at + "attn.c_attn.bias", ("blocks", "bqkv"), (i, ALL, ALL, ALL),
                      split=(0, (3, H, hd)), perm=(1, 0, 2)),
            # c_proj (H x hd, d) -> (H, hd, d) -> (d, H, hd)
            Placement(at + "attn.c_proj.weight", ("blocks", "wo"), (i, ALL, ALL, ALL),
                      split=(0, (H, hd)), perm=(2, 0, 1)),
            vector("attn.c_proj.bias", "bo"),
            vector("ln_2.weight", "mlp_norm"), vector("ln_2.bias", "mlp_norm_bias"),
            Placement(at + "mlp.c_fc.weight", ("blocks", "w_in"), (i, ALL, ALL)),
            vector("mlp.c_fc.bias", "b_in"),
            Placement(at + "mlp.c_proj.weight", ("blocks", "w_out"), (i, ALL, ALL), perm=(1, 0)),
            vector("mlp.c_proj.bias", "b_out"),
        ]

    return ([_embedding(cfg, prefix + "wte.weight"), Placement(prefix + "wpe.weight", ("positions",), (ALL, ALL))]
            + [p for i in range(cfg.n_layers) for p in layer(i)]
            + [Placement(prefix + "ln_f.weight", ("final_norm",), (ALL,)),
               Placement(prefix + "ln_f.bias", ("final_norm_bias",), (ALL,))] + _head(cfg))


def by_param(places: list[Placement]) -> dict[tuple[str, ...], list[Placement]]:
    grouped: dict[tuple[str, ...], list[Placement]] = {}
    for p in places:
        grouped.setdefault(p.param, []).append(p)
    return grouped


def fill_block(param_shape: tuple[int, ...], dtype, block: tuple[slice, ...], places: list[Placement],
               load: Callable[[str, tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """The block `block` of a parameter, assembled from the HF tensors placed in it (zeros elsewhere: the
    vocabulary padding). `load(name, slices)` reads a slice of an HF tensor."""
    ranges = [sel.indices(size)[:2] for sel, size in zip(block, param_shape)]
    out = np.zeros([stop - start for start, stop in ranges], dtype)
    for p in places:
        target, wanted = [], []
        for sel, size, (start, stop) in zip(p.index, param_shape, ranges):
            if isinstance(sel, int):
                if not start <= sel < stop:
                    break
                target.append(sel - start)
            else:
                lo, hi = sel.indices(size)[:2]
                a, b = max(lo, start), min(hi, stop)
                if a >= b:
                    break
                target.append(slice(a - start, b - start))
                wanted.append((a - lo, b - lo))
        else:
            out[tuple(target)] = p.read(lambda slices, name=p.name: load(name, slices), wanted)
    return out
