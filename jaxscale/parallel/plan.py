"""Which layers each pipeline stage runs, and what the schedule costs.

The layer stack keeps model-depth order (layer 0 first) whatever the mesh. It is cut into `stages x repeats`
chunks, numbered in depth order; chunk `c` runs on stage `c % stages` in repeat `c // stages`. GPipe has one
repeat: stage s holds one contiguous block. The circular schedule has several: stage s holds chunks s,
s + stages, s + 2 x stages, ..., and each microbatch travels round the ring of stages `repeats` times.

When the layers do not divide into chunks, every chunk gets `ceil(layers / chunks)` slots and the chunks
earliest in depth get the real layers first; the slots left over are padding, identity layers whose update is
masked out. Chunks are dealt to stages round-robin, so no stage has more than one real layer more than
another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxscale.errors import ConfigError

SCHEDULES = ("gpipe", "circular")


@dataclass
class PipelineConfig:
    """How the layer stack runs when mesh.pipeline > 1; ignored otherwise."""

    schedule: str = "gpipe"  # gpipe: one block of layers per stage | circular: `repeats` blocks per stage
    # Pieces each batch (each gradient-accumulation microbatch) is cut into; None: one per stage.
    microbatches: int | None = None
    repeats: int = 2  # circular only: layer chunks (virtual stages) per stage; the bubble shrinks by this
    # Unroll the schedule's iterations into straight-line code: no loop buffers, and with train.remat=none
    # nothing is recomputed. Faster on GPUs; compile time grows with iterations x layers per stage.
    unroll: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"pipeline.schedule={self.schedule!r}; choose gpipe or circular")
        if self.schedule == "circular" and self.repeats < 2:
            raise ConfigError(f"pipeline.repeats={self.repeats} with pipeline.schedule=circular: a circular "
                              f"schedule needs repeats >= 2 (one repeat is gpipe)")
        if self.microbatches is not None and self.microbatches < 1:
            raise ConfigError(f"pipeline.microbatches={self.microbatches} must be >= 1, or null for one per "
                              f"stage")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Share of the schedule's iterations that a stage spends idle: (p - 1) / (v m + p - 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


@dataclass(frozen=True)
class PipelinePlan:
    stages: int
    repeats: int
    microbatches: int
    chunk_layers: tuple[int, ...]  # real layers in each chunk, chunks in model-depth order
    unrolled: bool = False  # the iterations run as straight-line code instead of a loop

    @property
    def n_layers(self) -> int:
        return sum(self.chunk_layers)

    @property
    def layers_per_chunk(self) -> int:
        return max(self.chunk_layers)

    @property
    def padded(self) -> bool:
        return min(self.chunk_layers) < self.layers_per_chunk

    @property
    def iterations(self) -> int:
        """Schedule length: each microbatch through each chunk, plus stages - 1 to fill and drain the line."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches, self.repeats)

    def slot_layers(self) -> np.ndarray:
        """(repeats, stages, layers_per_chunk): the model-depth index of each slot's layer, -1 for padding."""
        slots = np.full((len(self.chunk_layers), self.layers_per_chunk), -1)
        start = 0
        for chunk, count in enumerate(self.chunk_layers):
            slots[chunk, :count] = np.arange(start, start + count)
            start += count
        return slots.reshape(self.repeats, self.stages, self.layers_per_chunk)


def plan_pipeline(n_layers: int, stages: int, microbatches: int, repeats: int = 1,
                  unrolled: bool = False) -> PipelinePlan:
    chunks = stages * repeats
    if microbatches < stages:
        raise ConfigError(f"pipeline.microbatches={microbatches} is fewer than the {stages} pipeline stages "
                          f"(mesh.pipeline): stages would idle in every iteration, and the circular schedule "
                          f"cannot run; use pipeline.microbatches >= {stages}, e.g. {2 * stages}")
    if n_layers < chunks:
        raise ConfigError(f"model.n_layers={n_layers} is fewer than mesh.pipeline x repeats = {stages} x "
                          f"{repeats} = {chunks} layer chunks; use fewer stages"
                          + (" or fewer pipeline.repeats" if repeats > 1 else ""))
    base, extra = divmod(n_layers, chunks)
    return PipelinePlan(stages, repeats, microbatches, tuple(base + (c < extra) for c in range(chunks)), unrolled)


def plan_from_config(settings: PipelineConfig, n_layers: int, stages: int) -> PipelinePlan:
    repeats = settings.repeats if settings.schedule == "circular" else 1
    microbatches = stages if settings.microbatches is None else settings.microbatches
    return plan_pipeline(n_layers, stages, microbatches, repeats, settings.unroll)


def describe_plan(plan: PipelinePlan) -> str:
    """A table of the layers each stage holds, in the order it runs them, for the training log."""
    slots = plan.slot_layers()
    schedule = "gpipe" if plan.repeats == 1 else f"circular, {plan.repeats} repeats"
    lines = [(f"pipeline: {plan.stages} stages ({schedule}), {plan.microbatches} microbatches, "
              f"{plan.iterations} iterations{' (unrolled)' if plan.unrolled else ''}, bubble {plan.bubble:.1%}"),
             f"{'stage':>5}  {'layers':>6}  {'padding':>7}  layers it runs (model depth), a range per repeat"]
    for stage in range(plan.stages):
        chunks = [slots[r, stage][slots[r, stage] >= 0] for r in range(plan.repeats)]
        real = sum(len(c) for c in chunks)
        ranges = ", ".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)
        lines.append(f"{stage:>5}  {real:>6}  {plan.repeats * plan.layers_per_chunk - real:>7}  {ranges}")
    return "\n".join(lines)
