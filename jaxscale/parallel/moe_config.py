"""The mixture-of-experts settings of the built-in decoder (`model.moe`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from jaxscale.errors import ConfigError, check_range
from jaxscale.parallel.plan import ONE_F_ONE_B_SCHEDULES


@dataclass
class MoEConfig:
    """Feed-forward layers as routed experts: each token goes to the `top_k` experts its router scores highest.

    Every `every`-th layer (layers every-1, 2 x every-1, ...) is a mixture-of-experts layer, the others keep the
    dense MLP. `shared_experts` are experts every token passes through besides its routed ones.
    """

    experts: int = 8
    top_k: int = 2
    shared_experts: int = 0
    every: int = 1
    d_ff: int | None = None  # each expert's hidden width; None: model.d_ff
    # Slots per expert for each device's tokens (of one pipeline microbatch on a pipeline mesh), as a multiple
    # of an even share (tokens x top_k / experts); tokens past them are dropped (the residual carries them
    # on). 0: dropless, every expert has room for all of a device's tokens (the buffers are then
    # experts / top_k times an even share).
    capacity_factor: float = 0.0
    # Dropless only: sort the (token, choice) rows by expert and run the experts as grouped matmuls
    # (jax.lax.ragged_dot) over exactly those rows, instead of buffers with room for every token per expert.
    # Experts on one rank (mesh.expert=1).
    grouped_matmul: bool = False
    aux_loss_weight: float = 0.01  # the balance loss: experts x sum over experts of (token share x mean probability)
    z_loss_weight: float = 0.001  # mean squared log-sum-exp of the router logits: keeps them small
    # The auxiliary-loss-free balancing: a per-expert bias added to the scores for choosing (not weighting)
    # experts, moved by this much each step towards even load (down for busy experts). 0: off.
    bias_update_rate: float = 0.0

    def __post_init__(self):
        check_range("model.moe.experts", self.experts, 2, note=" (one expert is the dense model)")
        check_range("model.moe.top_k", self.top_k, 1, self.experts,
                    note=f" (experts chosen per token, at most model.moe.experts={self.experts})")
        check_range("model.moe.shared_experts", self.shared_experts, 0)
        check_range("model.moe.every", self.every, 1, note=" (1: every layer is a mixture of experts)")
        if self.d_ff is not None:
            check_range("model.moe.d_ff", self.d_ff, 1, note=" (or null: model.d_ff)")
        if self.capacity_factor != 0:
            check_range("model.moe.capacity_factor", self.capacity_factor, 0, low_open=True,
                        note=" (e.g. 1.25), or 0 for dropless routing")
        if self.grouped_matmul and self.capacity_factor != 0:
            raise ConfigError(f"model.moe.grouped_matmul=true with model.moe.capacity_factor="
                              f"{self.capacity_factor}: the grouped matmuls are dropless; set capacity_factor=0 "
                              f"or grouped_matmul=false")
        for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            check_range(f"model.moe.{key}", getattr(self, key), 0, note=" (0 turns it off)")

    def check_layers(self, n_layers: int) -> None:
        if n_layers % self.every:
            raise ConfigError(f"model.n_layers={n_layers} is not a multiple of model.moe.every={self.every}: "
                              f"every {self.every}-th layer is a mixture of experts; choose an every that "
                              f"divides {n_layers}")

    def check_mesh(self, sizes: dict[str, int], schedule: str = "gpipe") -> None:
        """The experts against the mesh axis sizes and, on a pipeline mesh, its `schedule` (pipeline.schedule)."""
        if self.experts % sizes["expert"]:
            raise ConfigError(f"model.moe.experts={self.experts} does not split evenly over mesh.expert="
                              f"{sizes['expert']}; choose an expert axis size that divides {self.experts}")
        if self.d_ff % sizes["tensor"] or self.shared_experts * self.d_ff % sizes["tensor"]:
            raise ConfigError(f"model.moe.d_ff={self.d_ff} is not divisible by mesh.tensor={sizes['tensor']}; "
                              f"choose a tensor size that divides it")
        if self.grouped_matmul and sizes["expert"] > 1:
            raise ConfigError(f"model.moe.grouped_matmul=true with mesh.expert={sizes['expert']}: the grouped "
                              f"matmuls run with every expert on one rank; use mesh.expert=1 or "
                              f"grouped_matmul=false")
        if sizes["pipeline"] > 1 and schedule in ONE_F_ONE_B_SCHEDULES:
            raise ConfigError(f"model.moe with pipeline.schedule={schedule} is not supported: the balance loss, "
                              f"the router bias update and the routing metrics need each expert's load over the "
                              f"whole batch, and {schedule} starts the first microbatches' backwards before the "
                              f"last ones have been routed; use pipeline.schedule=gpipe or circular (with "
                              f"train.remat to save activation memory)")

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` tokens (those of one device)."""
        if self.capacity_factor == 0:
            return tokens  # top-k picks distinct experts: no expert gets a token twice
        return max(1, min(tokens, math.ceil(self.capacity_factor * tokens * self.top_k / self.experts)))
