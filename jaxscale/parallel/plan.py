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

SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zb1p")
ONE_F_ONE_B_SCHEDULES = ("1f1b", "interleaved_1f1b", "zb1p")  # the loss runs inside them: `run_layers_and_loss`
REPEATED_SCHEDULES = ("circular", "interleaved_1f1b")  # `repeats` layer chunks per stage


@dataclass
class PipelineConfig:
    """How the layer stack runs when mesh.pipeline > 1; ignored otherwise."""

    # gpipe: one block of layers per stage | circular: `repeats` blocks per stage | 1f1b: one block, each stage
    # alternating forwards and backwards | interleaved_1f1b: 1f1b with `repeats` blocks per stage | zb1p: 1f1b
    # with each backward split in two, the weights' gradient deferred into the ticks that would idle (ZB-H1)
    schedule: str = "gpipe"
    # Pieces each batch (each gradient-accumulation microbatch) is cut into; None: one per stage.
    microbatches: int | None = None
    repeats: int = 2  # circular, interleaved_1f1b: layer chunks (virtual stages) per stage; the bubble shrinks by this
    # Unroll the schedule's iterations into straight-line code: no loop buffers, and with train.remat=none
    # nothing is recomputed. Faster on GPUs; compile time grows with iterations x layers per stage.
    unroll: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"pipeline.schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule in REPEATED_SCHEDULES and self.repeats < 2:
            one = "gpipe" if self.schedule == "circular" else "1f1b"
            raise ConfigError(f"pipeline.repeats={self.repeats} with pipeline.schedule={self.schedule}: it needs "
                              f"repeats >= 2 (one repeat is {one})")
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
                  unrolled: bool = False, layers: str | None = None) -> PipelinePlan:
    """`n_layers` units of depth (layers, or a mixture of experts' layer groups) dealt to stages x repeats
    chunks; `layers` names that count in errors (default model.n_layers=N)."""
    chunks, layers = stages * repeats, layers or f"model.n_layers={n_layers}"
    if microbatches < stages:
        raise ConfigError(f"pipeline.microbatches={microbatches} is fewer than the {stages} pipeline stages "
                          f"(mesh.pipeline): stages would idle in every iteration, and the circular schedule "
                          f"cannot run; use pipeline.microbatches >= {stages}, e.g. {2 * stages}")
    if n_layers < chunks:
        raise ConfigError(f"{layers} is fewer than mesh.pipeline x repeats = {stages} x {repeats} = {chunks} "
                          f"layer chunks; use fewer stages"
                          + (" or fewer pipeline.repeats" if repeats > 1 else ""))
    base, extra = divmod(n_layers, chunks)
    return PipelinePlan(stages, repeats, microbatches, tuple(base + (c < extra) for c in range(chunks)), unrolled)


def plan_from_config(settings: PipelineConfig, n_layers: int, stages: int, layers: str | None = None) -> PipelinePlan:
    repeats = settings.repeats if settings.schedule in REPEATED_SCHEDULES else 1
    microbatches = stages if settings.microbatches is None else settings.microbatches
    return plan_pipeline(n_layers, stages, microbatches, repeats, settings.unroll, layers)


def describe_plan(plan: PipelinePlan, schedule: str | None = None) -> str:
    """A table of the layers each stage holds, in the order it runs them, for the training log. `schedule`:
    the pipeline.schedule name; None: gpipe or circular, by the plan's repeats."""
    slots = plan.slot_layers()
    schedule = schedule or ("gpipe" if plan.repeats == 1 else "circular")
    if plan.repeats > 1:
        schedule += f", {plan.repeats} repeats"
    bubble = zb1p_bubble(plan.stages, plan.microbatches) if schedule == "zb1p" else plan.bubble
    lines = [(f"pipeline: {plan.stages} stages ({schedule}), {plan.microbatches} microbatches, "
              f"{plan.iterations} iterations{' (unrolled)' if plan.unrolled else ''}, bubble {bubble:.1%}"),
             f"{'stage':>5}  {'layers':>6}  {'padding':>7}  layers it runs (model depth), a range per repeat"]
    for stage in range(plan.stages):
        chunks = [slots[r, stage][slots[r, stage] >= 0] for r in range(plan.repeats)]
        real = sum(len(c) for c in chunks)
        ranges = ", ".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)
        lines.append(f"{stage:>5}  {real:>6}  {plan.repeats * plan.layers_per_chunk - real:>7}  {ranges}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 1F1B schedules: each stage alternates forwards and backwards, so it holds few activations at a time

IDLE, FORWARD, BACKWARD, WEIGHTS = 0, 1, 2, 3


@dataclass(frozen=True)
class StepTable:
    """What each stage does in each tick of a 1F1B schedule, every array (ticks, stages). A tick runs one
    chunk's forward, backward or weights' gradient for one microbatch; what a tick produces reaches the
    neighbouring stage at the start of the next. Chunk `repeat x stages + stage` is the one
    `plan.slot_layers()` places there.

    With `split_backward` (zb1p) a BACKWARD op yields only the gradient of the chunk's input, which goes
    upstream at once, and a later WEIGHTS op the gradient of the chunk's weights; otherwise BACKWARD yields
    both and there are no WEIGHTS ops. A stage keeps each chunk input it receives in a stash slot, and each
    incoming gradient in a gradient slot, until the chunk's last op that needs it (BACKWARD, or WEIGHTS when
    split: both recompute the chunk's forward from the input); slots are reused once free, so `stash_slots` is
    the stage's peak of inputs held."""

    stages: int
    microbatches: int
    repeats: int
    kind: np.ndarray  # IDLE, FORWARD, BACKWARD or WEIGHTS
    repeat: np.ndarray  # which of the stage's chunks the op runs
    microbatch: np.ndarray
    slot: np.ndarray  # stash slot of the op's chunk input
    grad_slot: np.ndarray  # BACKWARD, WEIGHTS: gradient slot of the incoming gradient; -1 on the last chunk
    arriving_slot: np.ndarray  # stash slot for the activation arriving this tick, -1 if none
    arriving_grad_slot: np.ndarray  # gradient slot for the gradient arriving this tick, -1 if none
    stash_slots: int
    grad_slots: int
    split_backward: bool = False

    @property
    def ticks(self) -> int:
        return self.kind.shape[0]

    @property
    def bubble(self) -> float:
        """Share of stage-ticks spent idle (every op taken to cost one tick)."""
        return float(np.mean(self.kind == IDLE))

    def peak_stash(self) -> np.ndarray:
        """(stages,): the most chunk inputs each stage holds at once."""
        held = np.zeros(self.stages, int)
        peak = np.zeros(self.stages, int)
        arrived = self.arriving_slot >= 0
        last_use = WEIGHTS if self.split_backward else BACKWARD
        for t in range(self.ticks):
            first = (self.kind[t] == FORWARD) & (self.repeat[t] == 0)  # stage 0 takes chunk 0's input itself
            held += arrived[t] | (first & (np.arange(self.stages) == 0))
            peak = np.maximum(peak, held)
            held -= self.kind[t] == last_use
        return peak


def one_f_one_b_bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of a (interleaved) 1F1B schedule, forward and backward one tick each: (p-1)/(v m + p - 1),
    the same as GPipe and circular; 1F1B saves memory, interleaving (v > 1) shrinks the bubble."""
    return bubble_fraction(stages, microbatches, repeats)


def one_f_one_b_peak_stash(stages: int, microbatches: int, repeats: int = 1) -> list[int]:
    """Chunk inputs each stage holds at its peak, counting the one just received: stage s holds p - s for
    1F1B, and 2 (p - s - 1) + (v - 1) p + 1 for interleaved 1F1B (Megatron's warm-up forwards plus one), one
    more on stages > 0 (the next input arrives while the last is still held), at most v m. Independent of the
    microbatch count once m >= p, where GPipe holds m per stage and circular v m."""
    held = [stages - s if repeats == 1 else 2 * (stages - s - 1) + (repeats - 1) * stages + 1
            for s in range(stages)]
    return [min(h + (s > 0), repeats * microbatches) for s, h in enumerate(held)]


def zb1p_bubble(stages: int, microbatches: int) -> float:
    """Idle share of zb1p, forward, input gradient and weights' gradient one tick each: (p-1)/(3m + p - 1).
    Each stage idles p - 1 ticks, as in 1F1B, but of 3m + p - 1 instead of 2 (m + p - 1): the deferred
    weights' gradients fill the drain, so the bubble is about a third of 1F1B's."""
    return (stages - 1) / (3 * microbatches + stages - 1)


def zb1p_peak_stash(stages: int, microbatches: int) -> list[int]:
    """Chunk inputs each stage of zb1p holds at its peak: p on every stage, 1F1B's largest. Stage s runs its
    weights' gradients s microbatches late, so it holds s inputs more than 1F1B's p - s (and no extra one for
    the arriving input: it arrives after the oldest is freed). Each deferred weights' gradient also holds its
    incoming gradient: p - 1 gradient slots against 1F1B's one."""
    return [min(stages, microbatches)] * stages


def _stage_order(stages: int, microbatches: int, repeats: int, stage: int) -> list[tuple[int, int, int]]:
    """The ops of one stage in the order it runs them, (kind, repeat, microbatch): a warm-up of forwards, then
    one forward and one backward in turn, then the remaining backwards. Interleaved (repeats > 1), microbatches
    go in groups of `stages`, each group through every chunk of the stage (backwards: last chunk first)."""
    if repeats == 1:
        forwards = [(0, m) for m in range(microbatches)]
        warmup = min(stages - stage - 1, microbatches)
    else:
        groups = range(microbatches // stages)
        forwards = [(r, g * stages + i) for g in groups for r in range(repeats) for i in range(stages)]
        warmup = min(2 * (stages - stage - 1) + (repeats - 1) * stages, len(forwards))
    backwards = [(repeats - 1 - r, m) for r, m in forwards] if repeats == 1 else [
        (r, g * stages + i) for g in range(microbatches // stages) for r in reversed(range(repeats))
        for i in range(stages)]
    order = [(FORWARD, *op) for op in forwards[:warmup]]
    for f, b in zip(forwards[warmup:], backwards):
        order += [(FORWARD, *f), (BACKWARD, *b)]
    order += [(BACKWARD, *op) for op in backwards[len(forwards) - warmup:]]
    return order


def _zb1p_stage_order(stages: int, microbatches: int, stage: int) -> list[tuple[int, int, int]]:
    """1F1B's order with each backward followed by the weights' gradient of the microbatch `stage` backwards
    earlier (ZB-H1): stage 0 runs each at once, the last stage p - 1 late, and the ones left over run at the
    end, in the ticks where 1F1B waits for the last gradients to come back."""
    order = []
    for op in _stage_order(stages, microbatches, 1, stage):
        order.append(op)
        if op[0] == BACKWARD and op[2] >= stage:
            order.append((WEIGHTS, 0, op[2] - stage))
    return order + [(WEIGHTS, 0, mb) for mb in range(max(microbatches - stage, 0), microbatches)]


def _allocate(intervals: list[tuple[int, int, tuple]]) -> tuple[dict, int]:
    """Slots for [start, end] tick intervals, a slot free again the tick after its end: key -> slot, count."""
    free_at: list[int] = []  # per slot, the first tick it is free
    slots = {}
    for start, end, key in sorted(intervals):
        slot = next((i for i, t in enumerate(free_at) if t <= start), len(free_at))
        if slot == len(free_at):
            free_at.append(0)
        free_at[slot] = end + 1
        slots[key] = slot
    return slots, len(free_at)


def _check_microbatches(stages: int, microbatches: int) -> None:
    if microbatches < stages:
        raise ConfigError(f"pipeline.microbatches={microbatches} is fewer than the {stages} pipeline stages "
                          f"(mesh.pipeline); use pipeline.microbatches >= {stages}")


def one_f_one_b_table(stages: int, microbatches: int, repeats: int = 1) -> StepTable:
    """The tick-by-tick table of 1F1B (repeats = 1) or interleaved 1F1B (repeats = v chunks per stage): each
    stage runs its ops in `_stage_order`'s order, each as soon as its inputs have arrived."""
    p, m, v = stages, microbatches, repeats
    _check_microbatches(p, m)
    if v > 1 and m % p:
        raise ConfigError(f"pipeline.microbatches={m} with the interleaved 1F1B schedule must be a multiple of "
                          f"the {p} pipeline stages (microbatches go round in groups of one per stage); use "
                          f"pipeline.microbatches={p * -(-m // p)}")
    return _table(p, m, v, [_stage_order(p, m, v, s) for s in range(p)])


def zb1p_table(stages: int, microbatches: int) -> StepTable:
    """The tick-by-tick table of zb1p: each stage runs its ops in `_zb1p_stage_order`'s order, each as soon as
    its inputs have arrived."""
    _check_microbatches(stages, microbatches)
    return _table(stages, microbatches, 1, [_zb1p_stage_order(stages, microbatches, s)
                                             for s in range(stages)])


def schedule_table(schedule: str, stages: int, microbatches: int, repeats: int = 1) -> StepTable:
    """The table of a schedule in ONE_F_ONE_B_SCHEDULES (repeats: interleaved_1f1b's chunks per stage)."""
    if schedule == "zb1p":
        return zb1p_table(stages, microbatches)
    return one_f_one_b_table(stages, microbatches, repeats)


def _table(p: int, m: int, v: int, orders: list[list[tuple[int, int, int]]]) -> StepTable:
    """Runs each stage's `orders` (kind, repeat, microbatch) tick by tick, each op as soon as its inputs have
    arrived, and gives the ops their stash and gradient slots."""
    done: dict[tuple[int, int, int, int], int] = {}  # (kind, stage, repeat, microbatch) -> tick it ran

    def ready(kind: int, s: int, r: int, mb: int, t: int) -> bool:
        def before(key):
            return key in done and done[key] < t

        if kind == FORWARD:  # the previous chunk's output: stage s - 1, or the last stage one repeat earlier
            return (s == 0 and r == 0) or before((FORWARD, s - 1, r, mb) if s else (FORWARD, p - 1, r - 1, mb))
        if kind == WEIGHTS:
            return before((BACKWARD, s, r, mb))
        if not before((FORWARD, s, r, mb)):
            return False  # the next chunk's gradient, unless this is the model's last chunk
        return (s == p - 1 and r == v - 1) or before((BACKWARD, s + 1, r, mb) if s < p - 1
                                                     else (BACKWARD, 0, r + 1, mb))

    rows, position, t = [], [0] * p, 0
    while any(position[s] < len(orders[s]) for s in range(p)):
        row = [(IDLE, 0, 0)] * p
        for s in range(p):
            if position[s] < len(orders[s]):
                kind, r, mb = orders[s][position[s]]
                if ready(kind, s, r, mb, t):
                    row[s] = (kind, r, mb)
        for s, op in enumerate(row):
            if op[0] != IDLE:
                done[(op[0], s, op[1], op[2])] = t
                position[s] += 1
        rows.append(row)
        t += 1
        if t > 4 * (v * m + p) * 3:
            raise AssertionError("pipeline schedule does not make progress")  # an error in the stage order
    table = np.array(rows)  # (ticks, stages, 3)
    return _with_slots(p, m, v, table, done)


def _with_slots(p: int, m: int, v: int, table: np.ndarray, done: dict) -> StepTable:
    ticks = table.shape[0]
    split = any(key[0] == WEIGHTS for key in done)
    last_use = WEIGHTS if split else BACKWARD  # the input and the gradient are held until then
    stash, grads = [], []
    for s in range(p):
        for r in range(v):
            for mb in range(m):
                if s == 0 and r == 0:
                    arrive = done[(FORWARD, 0, 0, mb)]  # the input is read at the forward itself
                else:
                    arrive = done[(FORWARD, s - 1, r, mb) if s else (FORWARD, p - 1, r - 1, mb)] + 1
                stash.append((arrive, done[(last_use, s, r, mb)], (s, r, mb)))
                if not (s == p - 1 and r == v - 1):
                    source = (BACKWARD, s + 1, r, mb) if s < p - 1 else (BACKWARD, 0, r + 1, mb)
                    grads.append((done[source] + 1, done[(last_use, s, r, mb)], (s, r, mb)))
    slots, grad_slots = {}, {}
    stash_count = grad_count = 0
    for s in range(p):  # slots are per stage
        slot_s, n = _allocate([i for i in stash if i[2][0] == s])
        slots.update(slot_s)
        stash_count = max(stash_count, n)
        grad_s, n = _allocate([i for i in grads if i[2][0] == s])
        grad_slots.update(grad_s)
        grad_count = max(grad_count, n)
    slot = np.full((ticks, p), -1)
    grad_slot = np.full((ticks, p), -1)
    arriving = np.full((ticks, p), -1)
    arriving_grad = np.full((ticks, p), -1)
    for start, _, key in stash:
        if key[:2] != (0, 0):
            arriving[start, key[0]] = slots[key]
    for start, _, key in grads:
        arriving_grad[start, key[0]] = grad_slots[key]
    for t in range(ticks):
        for s in range(p):
            kind, r, mb = table[t, s]
            if kind != IDLE:
                slot[t, s] = slots[(s, r, mb)]
                grad_slot[t, s] = grad_slots.get((s, r, mb), -1) if kind in (BACKWARD, WEIGHTS) else -1
    return StepTable(p, m, v, table[..., 0], table[..., 1], table[..., 2], slot, grad_slot, arriving,
                     arriving_grad, stash_count, max(grad_count, 1), split)
