"""Does training state plus activations fit in each chip's HBM under the planned sharding? A rough check.

Training state: 16 bytes per parameter (f32 master weights 4 + f32 gradients 4 + Adam first and second
moments 8), sharded over the chips that split the parameters (fsdp x tensor x pipeline; every chip with ZeRO-3).

Activations (rough): the per-layer figure of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") for 16-bit activations and tensor parallelism without sequence parallelism,
s b h (10 + 24/t) bytes per layer, dropping its attention-score term (5 a s^2 b) because fused/flash attention
does not keep the scores; plus one f32 copy of the logits (4 s b V / t). With full rematerialisation only each
layer's 16-bit input (2 s b h) is kept, plus one layer's working set during its recomputation. Memory of the
compiler's temporaries, fragmentation and communication buffers is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

STATE_BYTES_PER_PARAM = 16  # f32 master 4 + f32 grads 4 + Adam m, v 8


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    state_shards: int  # chips the parameters, gradients and optimizer state are split over
    state_bytes_per_chip: float
    activation_bytes_per_chip: float
    hbm_bytes: float | None

    @property
    def total_bytes_per_chip(self) -> float:
        return self.state_bytes_per_chip + self.activation_bytes_per_chip

    @property
    def fits(self) -> bool | None:
        """None when the catalog does not know the chip's HBM."""
        return None if self.hbm_bytes is None else self.total_bytes_per_chip <= self.hbm_bytes


def state_shard_count(mesh_sizes: dict[str, int], zero3: bool) -> int:
    """How many chips split the training state: fsdp x tensor x pipeline, or every chip with ZeRO-3."""
    if zero3:
        product = 1
        for size in mesh_sizes.values():
            product *= size
        return product
    return mesh_sizes["fsdp"] * mesh_sizes["tensor"] * mesh_sizes["pipeline"]


def activation_bytes_per_chip(seq_len: int, d_model: int, n_layers: int, vocab_size: int, batch_size: int,
                              mesh_sizes: dict[str, int], microbatches: int = 1, remat: str = "none") -> float:
    """Rough activation bytes kept for the backward pass on one chip (see the module docstring)."""
    batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes.get("expert", 1)
    sequences = batch_size / (batch_shards * microbatches)  # one microbatch's sequences on this chip
    t = mesh_sizes["tensor"]
    layers = n_layers / mesh_sizes["pipeline"]
    tokens = seq_len * sequences
    per_layer = tokens * d_model * (10 + 24 / t)
    logits = 4 * tokens * vocab_size / t
    if remat == "full":
        return 2 * tokens * d_model * layers + per_layer + logits
    return per_layer * layers + logits  # "none", and "dots" counted as "none": an upper bound for it


def training_memory(params: int, state_shards: int, activation_bytes: float, hbm_bytes: float | None
                    ) -> MemoryEstimate:
    return MemoryEstimate(params=params, state_shards=state_shards,
                          state_bytes_per_chip=params * STATE_BYTES_PER_PARAM / state_shards,
                          activation_bytes_per_chip=activation_bytes, hbm_bytes=hbm_bytes)
