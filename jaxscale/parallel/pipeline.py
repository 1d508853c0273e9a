"""The pipelined layer stack: one SPMD program in which stages pass microbatches on like an assembly line.

Stage s is pipeline rank s. The stacked layer weights (L, ...) stay in model-depth order and are regrouped
inside the forward pass as (stages, repeats, layers per chunk, ...), sharded over `pipeline` on the first
dimension (`jaxscale.parallel.plan` says which layers go where). With GPipe that regrouping is a reshape of
the `"layers": "pipeline"` sharding and moves nothing. With the circular schedule a stage's chunks are not
contiguous in depth, so each rank's share of the stack moves to the rank that runs it once per step, and the
gradients move back.

Each iteration, every stage runs its chunk on the activation buffer `state` (stages, microbatch, length,
embed): a `vmap` over the stage dimension with `spmd_axis_name="pipeline"`, so each rank computes its own
stage. The buffer is then rolled by one along the stage dimension, which XLA lowers to a collective-permute
between neighbouring ranks. The last stage's output rolls round to stage 0. There, a per-stage buffer `stream`
(stages, microbatches, ...), of which only stage 0's slice is used, holds the inputs at the start, each
microbatch's output of one trip round the ring until it starts the next (circular), and the results at the
end.

Schedule: stream position q = repeat x microbatches + microbatch enters stage 0 in iteration q and reaches
stage s in iteration q + s. A microbatch leaves the last stage in iteration q + stages - 1 and is back at
stage 0 for its next repeat in iteration q + microbatches, which needs microbatches >= stages. The schedule
runs repeats x microbatches + stages - 1 iterations; stages with nothing to do compute on stale data whose
result is never used (SPMD: every rank runs the same program).

The layers may also carry totals beside the activations (`run_layers`), e.g. a mixture of experts' routing
statistics: they travel in buffers of their own alongside `state` and `stream`, each microbatch with its own,
and come out averaged over the microbatches.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import ConfigError
from jaxscale.parallel.plan import ONE_F_ONE_B_SCHEDULES, PipelineConfig, PipelinePlan, plan_from_config
from jaxscale.remat import dots_and_attention_saveable, remat_policy
from jaxscale.sharding import Rules, activation_rules, constrain, current_activation_rules, rule_axes
from jaxscale.trace_notes import note

STATE_AXES = ("stage", "batch", "length", "embed")  # cut to the activation's rank, (batch, length) or (batch,)
STREAM_AXES = ("stage", None, "batch", "length", "embed")

# apply_layer(x, layer_params, segment_ids) -> x: one layer on one microbatch. x is the activations, or a pair
# (activations, totals) (`run_layers`).
LayerFn = Callable[[object, dict, "jax.Array | None"], object]


def active_plan(n_layers: int, settings: PipelineConfig | None) -> PipelinePlan | None:
    """The plan when the step being traced runs on a mesh whose pipeline axis is > 1, scheduled as `settings`
    (the run's `pipeline.*` config) say; None otherwise. Each plan made is noted as a trace note of kind
    "pipeline" (`jaxscale.trace_notes`): the trainer refuses a pipeline mesh on which the model staged nothing."""
    context = current_activation_rules()
    stages = context[0].shape.get("pipeline", 1) if context else 1
    if stages == 1:
        return None
    if settings is None:
        raise ConfigError(f"the layers run on a mesh with mesh.pipeline={stages}, but run_layers got no pipeline "
                          f"settings to schedule the stages with: pass settings=config.pipeline (the run's "
                          f"pipeline.* keys; README: Bring your own model)")
    note("pipeline", settings.schedule)
    return plan_from_config(settings, n_layers, stages)


def run_layers(apply_layer: LayerFn, stack, x, segment_ids: jax.Array | None = None, *,
               remat: str = "none", unroll: int = 1, settings: PipelineConfig | None = None):
    """x through every layer of `stack` (a pytree of weights stacked over a leading `layers` dimension, e.g.
    the state of an `nnx.vmap`-made module): a scan over the layers, or, on a mesh whose pipeline axis is > 1,
    pipeline stages scheduled as `settings` (the run's `config.pipeline`, needed there) say. `apply_layer(x,
    layer, segment_ids)` runs one layer; `remat` is a train.remat policy name. This is how a model of one's own
    is staged.

    x is the activations (batch, ...), or a pair (activations, totals) that each layer returns updated:
    `totals` a pytree of statistics the layers add to, each a mean over the batch's rows (e.g. routing
    statistics). Pipelined, every microbatch starts from the given totals and the result is the mean of the
    microbatches' own, which is the whole batch's (the microbatches have equal rows)."""
    n_layers = jax.tree.leaves(stack)[0].shape[0]
    plan = active_plan(n_layers, settings)
    schedule = settings.schedule if settings is not None else None
    if plan is not None and schedule in ONE_F_ONE_B_SCHEDULES:
        raise ConfigError(f"pipeline.schedule={schedule} runs each microbatch's loss inside the schedule, but the "
                          f"model ran its layers through run_layers, which returns their output: run the layers "
                          f"and the loss through jaxscale.parallel.run_layers_and_loss (README: Bring your own "
                          f"model), or use pipeline.schedule=gpipe or circular")
    if plan is not None:  # remat applies to whole pipeline iterations there
        return pipelined_layers(apply_layer, stack, x, segment_ids, plan, remat, unroll)
    if remat != "none":
        apply_layer = jax.checkpoint(apply_layer, policy=remat_policy(remat), prevent_cse=False)
    return jax.lax.scan(lambda x, p: (apply_layer(x, p, segment_ids), None), x, stack, unroll=unroll)[0]


def stage_rules(rules: Rules) -> Rules:
    """Activation rules inside the pipeline: the stage dimension owns the `pipeline` axis. (A batch rule that
    lists `pipeline` spreads the embedding and output head over the pipeline ranks; inside it must not.)"""

    def without_pipeline(target):
        return [a for a in rule_axes(target) if a != "pipeline"]

    return {**{name: without_pipeline(target) for name, target in rules.items()}, "stage": "pipeline"}


def outer_rules(rules: Rules, mesh: Mesh, rows: int) -> Rules:
    """Activation rules for the work outside the stages (embedding, output head, loss). With a pipeline axis
    > 1 their batch is split over the pipeline ranks as well, which would otherwise each repeat the whole
    batch's head and embedding gradient; the stage buffer gathers the rows into stage 0 and the result goes back
    out. `rows` is what each batch shard holds; left as it is where they do not split evenly over the ranks."""
    stages = mesh.shape.get("pipeline", 1)
    axes = rule_axes(rules.get("batch"))
    if stages == 1 or "pipeline" in axes or rows % stages:
        return rules
    return {**rules, "batch": [*axes, "pipeline"]}


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """(B, ...) -> (count, B / count, ...); microbatch m = rows m, m + count, ..., so that every microbatch is
    spread over all batch shards."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def by_stage(w: jax.Array, plan: PipelinePlan, mesh: Mesh | None) -> jax.Array:
    """A stacked weight (L, ...) in model-depth order -> (stages, repeats, layers per chunk, ...)."""
    v, p, k = plan.repeats, plan.stages, plan.layers_per_chunk
    if plan.padded:  # padding slots borrow layer 0's weights; their update is masked out
        w = w[np.maximum(plan.slot_layers(), 0).reshape(-1)]
    w = w.reshape(v, p, k, *w.shape[1:]).swapaxes(0, 1)
    if mesh is None:
        return w
    # Only the stage dimension is pinned; fsdp / tensor sharding of the weight's own dimensions carries over.
    spec = PartitionSpec("pipeline", None, None, *[PartitionSpec.UNCONSTRAINED] * (w.ndim - 3))
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec))


@jax.custom_vjp
def next_stage(x: jax.Array) -> jax.Array:
    """x (stages, ...): stage s's rows move to stage s + 1 and the last stage's to stage 0. With the stage
    dimension sharded this is one collective-permute, and so is its gradient, the opposite shift. Left to
    autodiff, the transpose of `jnp.roll` (slices, pads and an add) compiled to two to four permutes per
    schedule iteration, and the forward ones cannot overlap."""
    return jnp.roll(x, 1, axis=0)


def _next_stage_forward(x):
    return jnp.roll(x, 1, axis=0), None


def _next_stage_backward(_, gradient):
    return (jnp.roll(gradient, -1, axis=0),)


next_stage.defvjp(_next_stage_forward, _next_stage_backward)


def per_stage(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (stages, n, ...), index (stages,) -> (stages, ...): each stage's row, picked on its own rank."""
    return jax.vmap(lambda row, i: jax.lax.dynamic_index_in_dim(row, i, 0, keepdims=False))(x, index)


def stage_remat_policy(remat: str, unrolled: bool):
    """The jax.checkpoint policy for one iteration of all stages, from `train.remat`; None: keep everything.

    full and dots: as everywhere (`jaxscale.remat`). none, unrolled: keep every residual. none, looped: every
    matmul's and fused attention's outputs are kept and the elementwise rest is recomputed, which is faster
    than keeping everything there: the loop stacks each iteration's residuals into per-iteration buffers, and
    copying them all cost more than the recompute (BENCHMARKS.md, pipeline parallelism). With several repeats, keeping everything would also keep each
    iteration's picked weights.
    """
    if remat != "none" or unrolled:
        return remat_policy(remat)
    return dots_and_attention_saveable


def pipelined_layers(apply_layer: LayerFn, stack, x, segment_ids: jax.Array | None, plan: PipelinePlan,
                     remat: str = "none", unroll: int = 1):
    """x (batch, ...), or (activations, totals) as `run_layers` takes them, through every layer of `stack`,
    pipelined: the same result as scanning them.
    `remat` (train.remat) applies to each iteration of all stages, see `stage_remat_policy`; `unroll`
    (train.scan_unroll) is how many of a chunk's layers each step of its loop runs.

    Outside `activation_rules` (no mesh) the same schedule runs on one device, which is how its arithmetic is
    tested without a pipeline mesh.
    """
    context = current_activation_rules()
    if context is None:
        return run_schedule(apply_layer, stack, x, segment_ids, plan, remat, unroll, mesh=None)
    mesh, rules = context
    with activation_rules(mesh, stage_rules(rules)):
        y = run_schedule(apply_layer, stack, x, segment_ids, plan, remat, unroll, mesh)
    if isinstance(y, tuple):
        return constrain(y[0], STATE_AXES[1:y[0].ndim + 1]), y[1]
    return constrain(y, STATE_AXES[1:y.ndim + 1])


def run_schedule(apply_layer: LayerFn, stack, x, segment_ids: jax.Array | None, plan: PipelinePlan,
                 remat: str, unroll: int, mesh: Mesh | None):
    pair = isinstance(x, tuple)  # (activations, totals), see run_layers
    activations, totals = x if pair else (x, None)
    stages, repeats, count = plan.stages, plan.repeats, plan.microbatches
    if activations.shape[0] % count:
        raise ValueError(f"a batch of {activations.shape[0]} rows does not split into {count} pipeline "
                         f"microbatches")
    step = apply_layer if pair else (lambda flow, p, seg: (apply_layer(flow[0], p, seg), None))

    def on_stage0(leaf):  # broadcasts against a (stages, ...) leaf
        return (jnp.arange(stages) == 0).reshape(stages, *[1] * (leaf.ndim - 1))

    def where_stage0(cond, new, old):  # leaf by leaf: stage 0's rows from `new` where `cond`, else `old`
        return jax.tree.map(lambda a, b: jnp.where(on_stage0(b) & cond, a, b), new, old)

    weights = jax.tree.map(lambda w: by_stage(w, plan, mesh), stack)
    real = jnp.asarray(plan.slot_layers().swapaxes(0, 1) >= 0)  # (stages, repeats, layers per chunk)
    segments = None if segment_ids is None else split_microbatches(segment_ids, count)

    # Each microbatch's activations and its own totals, which start where the given ones are.
    inputs = (split_microbatches(activations, count),
              jax.tree.map(lambda t: jnp.broadcast_to(t, (count, *jnp.shape(t))), totals))
    stream = constrain_flow(where_stage0(True, jax.tree.map(lambda a: a[None], inputs),
                                         jax.tree.map(lambda a: jnp.zeros((stages, *a.shape), a.dtype), inputs)),
                            STREAM_AXES)
    state = constrain_flow(jax.tree.map(lambda a: jnp.zeros((stages, *a.shape[1:]), a.dtype), inputs), STATE_AXES)

    def run_chunk(w, real, flow, seg):  # one stage: its chunk's layers in order; padding slots leave it as it was
        def body(flow, slot):
            p, is_real = slot
            out = step(flow, p, seg)
            return (jax.tree.map(lambda y, x: jnp.where(is_real, y, x), out, flow) if plan.padded else out), None

        return jax.lax.scan(body, flow, (w, real), unroll=unroll)[0]

    def run_stages(state, repeat, seg):
        if repeats == 1:
            w, mask = jax.tree.map(lambda a: a[:, 0], (weights, real))
        else:  # each stage picks its chunk for the repeat it is in
            w, mask = jax.tree.map(lambda a: per_stage(a, repeat), (weights, real))
        each_stage = jax.vmap(run_chunk, spmd_axis_name="pipeline" if mesh is not None else None)
        return each_stage(w, mask, state, seg)

    policy = stage_remat_policy(remat, plan.unrolled)
    if policy is not None:
        run_stages = jax.checkpoint(run_stages, policy=policy, prevent_cse=False)

    def iteration(carry, i):  # i: a traced loop counter, or a Python int when unrolled
        state, stream = carry
        starting = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i % count, 1, keepdims=False), stream)
        state = where_stage0(i < repeats * count, starting, state)
        position = i - jnp.arange(stages)  # each stage's place in the stream of (repeat, microbatch)
        seg = None if segments is None else segments[position % count]
        out = run_stages(constrain_flow(state, STATE_AXES), jnp.clip(position // count, 0, repeats - 1), seg)
        state = constrain_flow(jax.tree.map(next_stage, out), STATE_AXES)  # stage s -> s + 1; the last -> 0
        arrived = i + 1 - stages  # stream position of what the last stage just handed to stage 0
        slot = arrived % count
        kept = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, 1, keepdims=False), stream)
        kept = where_stage0(arrived >= 0, state, kept)
        return (state, jax.tree.map(lambda a, k: jax.lax.dynamic_update_index_in_dim(a, k, slot, 1),
                                    stream, kept)), None

    carry = (state, stream)
    if plan.unrolled:  # straight-line code: no loop buffers, and the index arithmetic is static
        for i in range(plan.iterations):
            carry, _ = iteration(carry, i)
    else:
        carry, _ = jax.lax.scan(iteration, carry, jnp.arange(plan.iterations))
    # Stage 0's results, taken as a sum over stages of which all but stage 0's are zeroed: a reduce-scatter
    # that can leave each rank its own rows, where indexing stage 0 would gather the whole buffer first.
    results = jax.tree.map(lambda a: jnp.sum(jnp.where(on_stage0(a), a, 0), axis=0, dtype=a.dtype), carry[1])
    outputs = merge_microbatches(results[0])
    # Each microbatch's totals are means over its rows; the microbatches have equal rows.
    return (outputs, jax.tree.map(lambda t: jnp.mean(t, axis=0), results[1])) if pair else outputs


def constrain_flow(flow, axes: tuple[str | None, ...]):
    """(activations, totals) in a stage buffer: the activations as `axes` (STATE_AXES or STREAM_AXES) cut to
    their rank say, the totals with only the stage dimension over the pipeline ranks."""
    activations, totals = flow
    return (constrain(activations, axes[:activations.ndim]),
            jax.tree.map(lambda t: constrain(t, ("stage",) + (None,) * (t.ndim - 1)), totals))
