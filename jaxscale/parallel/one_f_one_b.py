"""1F1B, interleaved 1F1B and zb1p: each pipeline stage alternates one microbatch's forward with another's
backward, so it holds the inputs of about `stages` microbatches at a time instead of all of them (GPipe,
circular).

The backward of a microbatch has to start before later microbatches have run forwards, so the loss must be
taken per microbatch inside the schedule: `value_and_grad` takes the head (`loss_fn`, run on the model's last
chunk) with the layer stack and returns the loss with the gradients of the stack, the head and the input, in
one pass. It runs one SPMD program: a scan over the ticks of a `plan.StepTable`, in which every stage first
receives what its neighbours sent in the previous tick (two collective-permutes, activations forward,
gradients backward) and then runs its own op from the table, a forward, a backward, a weights' gradient or
nothing, under `lax.switch` (on a mesh, inside `shard_map`, so a rank runs only its own branch). A backward
recomputes its chunk's forward from the stashed input (`jax.vjp` of the chunk), as `train.remat=full` does,
so what a stage holds is its stash of chunk inputs: `plan.one_f_one_b_peak_stash`.

zb1p (ZB-H1 of "Zero Bubble Pipeline Parallelism", Qi et al. 2023) splits the backward: BACKWARD takes the
gradient of the chunk's input, which goes upstream at once, and WEIGHTS, later, the gradient of its weights,
in ticks where 1F1B idles; the bubble falls from (p-1)/(m+p-1) to (p-1)/(3m+p-1) of the ticks. WEIGHTS
recomputes the chunk's forward from the stashed input too, so a pending one holds the input and its incoming
gradient, two activations, and the stash peaks at p, 1F1B's largest. The other way, BACKWARD keeping the
chunk's vjp residuals for WEIGHTS, would save that recompute but hold every residual of the chunk's layers
(attention included) per pending WEIGHTS: 129 activations against 2 for the tiny Llama chunk of
experiments/pipeline_schedule_memory.py. Either way the weights' half is no cheap remainder: the chunk's
layers run as a scan, and its transpose carries the gradient back through every layer to reach each layer's
weights, so WEIGHTS costs about what the whole backward does and the split adds work. As every tick lasts as
long as the costliest op any stage runs in it, zb1p's step costs more than 1F1B's here at every microbatch
count measured, its smaller bubble outweighed by the added work (BENCHMARKS.md, pipeline schedules). Its
table, bubble and memory are the paper's; a faster step needs what this design lacks: ticks that cost each
stage only its own op, and a weights' half without the recompute and the gradient chain.

Without a mesh the stages run as a `vmap` on one device (every branch computed, the table's choice kept),
which is how the arithmetic is tested.

The trainer reaches it through `run_layers_and_loss` (`pipeline.schedule=1f1b`, `interleaved_1f1b` or `zb1p`):
a `custom_vjp` whose forward runs the schedule and keeps the gradients, so the work before the layers (the
embedding) is differentiated as usual from the input's gradient.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxscale.parallel.pipeline import (
    LayerFn,
    active_plan,
    by_stage,
    pipelined_layers,
    run_layers,
    split_microbatches,
    stage_rules,
)
from jaxscale.parallel.plan import (
    BACKWARD,
    FORWARD,
    ONE_F_ONE_B_SCHEDULES,
    WEIGHTS,
    PipelineConfig,
    PipelinePlan,
    StepTable,
    schedule_table,
)
from jaxscale.sharding import activation_rules, current_activation_rules

# loss_fn(head, y, microbatch) -> scalar: the loss of one microbatch's output of the last layer; the step's
# loss is the sum over microbatches.
LossFn = Callable[[object, jax.Array, jax.Array], jax.Array]

AXIS = "pipeline"

# head_loss(head, y, targets) -> scalar: the mean loss over the rows of y (the last layer's output) against
# `targets` (a pytree of arrays whose first dimension is those rows), with the weights `head`.
HeadLossFn = Callable[[object, jax.Array, object], jax.Array]


def run_layers_and_loss(apply_layer: LayerFn, stack, x: jax.Array, segment_ids: jax.Array | None,
                        head_loss: HeadLossFn, head, targets, *, remat: str = "none", unroll: int = 1,
                        settings: PipelineConfig | None = None) -> jax.Array:
    """head_loss(head, layers(x), targets): x through every layer of `stack` as `run_layers` runs it, then the
    loss. Under a 1F1B schedule (`pipeline.schedule=1f1b`, `interleaved_1f1b` or `zb1p` on a pipeline mesh) each
    microbatch's loss is taken inside the schedule, on the last stage, so that its backward can start before
    the later microbatches' forwards; the value is then the mean of the microbatches' losses, equal to the
    whole batch's when `head_loss` is a mean over rows (microbatches have equal rows). `train.remat` and
    `unroll` do not apply there: a stage's backward always recomputes its chunk's forward from the stashed
    input. This is how a model of one's own is staged with 1F1B."""
    n_layers = jax.tree.leaves(stack)[0].shape[0]
    plan = active_plan(n_layers, settings)
    if plan is None or settings.schedule not in ONE_F_ONE_B_SCHEDULES:  # a plan implies settings
        y = run_layers(apply_layer, stack, x, segment_ids, remat=remat, unroll=unroll, settings=settings)
        return head_loss(head, y, targets)
    mesh, rules = current_activation_rules()
    with activation_rules(mesh, stage_rules(rules)):
        table = schedule_table(settings.schedule, plan.stages, plan.microbatches, plan.repeats)
        return pipelined_loss(apply_layer, head_loss, stack, head, x, segment_ids, targets, plan, table, mesh)


def pipelined_loss(apply_layer: LayerFn, head_loss: HeadLossFn, stack, head, x: jax.Array,
                   segment_ids: jax.Array | None, targets, plan: PipelinePlan, table: StepTable,
                   mesh: Mesh | None) -> jax.Array:
    """The mean over microbatches of head_loss(head, layers(x_m), targets_m), differentiable in `stack`, `head`
    and `x`: differentiated, the 1F1B schedule (`value_and_grad`) runs forwards and backwards together and
    the gradients are kept for the backward pass, which only scales them by the incoming cotangent. Evaluated
    without a gradient, the layers run forward only, as GPipe (or circular, interleaved) runs them."""
    m = plan.microbatches

    def microbatch_loss(targets):
        split = jax.tree.map(lambda t: split_microbatches(t, m), targets)
        return lambda h, y, mb: head_loss(h, y, jax.tree.map(lambda t: t[mb], split)) / m

    @jax.custom_vjp
    def loss(stack, head, x, segment_ids, targets):
        ys = split_microbatches(pipelined_layers(apply_layer, stack, x, segment_ids, plan), m)
        each = microbatch_loss(targets)
        return jnp.sum(jax.lax.map(lambda mb: each(head, ys[mb], mb), jnp.arange(m)))

    def forward_and_backward(stack, head, x, segment_ids, targets):  # (loss, its gradients as residuals)
        return value_and_grad(apply_layer, microbatch_loss(targets), stack, head, x, segment_ids, plan, table,
                              mesh)

    def scaled(grads, cotangent):
        return (*jax.tree.map(lambda g: (g * cotangent).astype(g.dtype), grads), None, None)

    loss.defvjp(forward_and_backward, scaled)
    return loss(stack, head, x, segment_ids, targets)


def value_and_grad(apply_layer: LayerFn, loss_fn: LossFn, stack, head, x: jax.Array,
                   segment_ids: jax.Array | None, plan: PipelinePlan, table: StepTable,
                   mesh: Mesh | None = None):
    """sum over microbatches of loss_fn(head, layers(x_m), m), and its gradients with respect to `stack`
    (weights stacked over a leading layers dimension, in model-depth order), `head` and `x`: (loss, (d_stack,
    d_head, d_x)). `plan` places the layers (its repeats are the interleaving), `table` orders the work."""
    p, v, m = plan.stages, plan.repeats, plan.microbatches
    if (table.stages, table.repeats, table.microbatches) != (p, v, m):
        raise ValueError(f"a schedule table for {table.stages} stages, {table.repeats} repeats and "
                         f"{table.microbatches} microbatches does not fit a plan for {p}, {v} and {m}")
    if x.shape[0] % m:
        raise ValueError(f"a batch of {x.shape[0]} rows does not split into {m} pipeline microbatches")
    staged, unstage = jax.vjp(lambda s: jax.tree.map(lambda w: by_stage(w, plan, None), s), stack)
    real = jnp.asarray(plan.slot_layers().swapaxes(0, 1) >= 0)  # (stages, repeats, layers per chunk)
    rows = jnp.asarray(np.stack([table.kind, table.repeat, table.microbatch, table.slot, table.grad_slot,
                                 table.arriving_slot, table.arriving_grad_slot], axis=-1), jnp.int32)
    xs = split_microbatches(x, m)
    segments = None if segment_ids is None else split_microbatches(segment_ids, m)

    def run_chunk(w, mask, x, seg):  # one chunk's layers in order; padding slots leave x as it was
        def body(x, slot):
            layer, is_real = slot
            y = apply_layer(x, layer, seg)
            return (jnp.where(is_real, y, x) if plan.padded else y), None

        return jax.lax.scan(body, x, (w, mask))[0]

    def on_stage(weights, mask, schedule, head, xs, segments):
        """One stage's part: weights (repeats, layers per chunk, ...), schedule (ticks, 7) its column."""
        stage = jax.lax.axis_index(AXIS)
        activation = jnp.zeros(xs.shape[1:], xs.dtype)

        def pick(tree, i):
            return jax.tree.map(lambda a: a[i], tree)

        def forward(carry, r, mb, slot, grad_slot):
            first = (stage == 0) & (r == 0)
            x_in = jnp.where(first, xs[mb], carry["stash"][slot])
            seg = None if segments is None else segments[mb]
            carry["stash"] = carry["stash"].at[slot].set(x_in)
            carry["send"] = run_chunk(pick(weights, r), mask[r], x_in, seg)
            return carry

        def backward(carry, r, mb, slot, grad_slot, *, weights_grad: bool, input_grad: bool):
            """Chunk r's backward for microbatch mb, its forward recomputed from the stashed input: the
            gradient of its weights (`weights_grad`), and of its input, the head and the loss (`input_grad`).
            BACKWARD takes both, zb1p's BACKWARD the input's alone and its WEIGHTS the weights'."""
            x_in, w = carry["stash"][slot], pick(weights, r)
            seg = None if segments is None else segments[mb]
            incoming = carry["grads"][jnp.maximum(grad_slot, 0)]
            wrt = ((0,) if weights_grad else ()) + ((1, 2) if input_grad else ())  # of (weights, head, input)

            def pulled(f, cotangent):  # f(w, head, x_in) and its vjp in the arguments `wrt` names
                def of(*chosen):
                    return f(*(chosen[wrt.index(i)] if i in wrt else a for i, a in enumerate((w, head, x_in))))

                out, pull = jax.vjp(of, *((w, head, x_in)[i] for i in wrt))
                return out, dict(zip(wrt, pull(jnp.ones_like(out) if cotangent is None else cotangent)))

            def last_chunk():  # the model's last chunk: the loss is taken here
                return pulled(lambda w, h, x: loss_fn(h, run_chunk(w, mask[r], x, seg), mb), None)

            def inner_chunk():  # the head is not used: zeros for its gradient
                _, grads = pulled(lambda w, h, x: run_chunk(w, mask[r], x, seg), incoming)
                if input_grad:
                    grads[1] = jax.tree.map(jnp.zeros_like, head)
                return jnp.zeros((), jnp.float32), grads

            loss, grads = jax.lax.cond((stage == p - 1) & (r == v - 1), last_chunk, inner_chunk)
            if weights_grad:
                carry["d_weights"] = jax.tree.map(lambda a, g: a.at[r].add(g), carry["d_weights"], grads[0])
            if input_grad:
                carry["loss"] = carry["loss"] + loss.astype(jnp.float32)
                carry["d_head"] = jax.tree.map(jnp.add, carry["d_head"], grads[1])
                carry["send_back"] = grads[2]
            return carry

        def idle(carry, *_):
            return carry

        def tick(carry, row):
            kind, r, mb, slot, grad_slot, arriving, arriving_grad = (row[i] for i in range(7))
            received = jax.lax.ppermute(carry["send"], AXIS, [(i, (i + 1) % p) for i in range(p)])
            received_back = jax.lax.ppermute(carry["send_back"], AXIS, [(i, (i - 1) % p) for i in range(p)])
            stash_slots, grad_slots = carry["stash"].shape[0], carry["grads"].shape[0]
            carry = {**carry,  # an index past the end drops the write: nothing arrived
                     "stash": carry["stash"].at[jnp.where(arriving >= 0, arriving, stash_slots)].set(
                         received, mode="drop"),
                     "grads": carry["grads"].at[jnp.where(arriving_grad >= 0, arriving_grad, grad_slots)].set(
                         received_back, mode="drop")}
            branches = [idle, forward, partial(backward, weights_grad=not table.split_backward, input_grad=True)]
            if table.split_backward:
                branches.append(partial(backward, weights_grad=True, input_grad=False))
            assert len(branches) - 1 == (WEIGHTS if table.split_backward else BACKWARD) and FORWARD == 1
            d_x = carry.pop("d_x")  # kept out of the switch, where XLA may copy it (on zb1p it did)
            carry = jax.lax.switch(kind, branches, carry, r, mb, slot, grad_slot)
            first = (kind == BACKWARD) & (stage == 0) & (r == 0)  # the model's input: its gradient is kept
            return {**carry, "d_x": d_x.at[jnp.where(first, mb, m)].set(carry["send_back"], mode="drop")}, None

        carry = {"stash": jnp.zeros((table.stash_slots, *activation.shape), xs.dtype),
                 "grads": jnp.zeros((table.grad_slots, *activation.shape), xs.dtype),
                 "send": activation, "send_back": activation,
                 "loss": jnp.zeros((), jnp.float32),
                 "d_weights": jax.tree.map(jnp.zeros_like, weights),
                 "d_head": jax.tree.map(jnp.zeros_like, head),
                 "d_x": jnp.zeros_like(xs)}
        carry, _ = jax.lax.scan(tick, carry, schedule)
        # Only the last stage has loss and head gradients, only stage 0 input gradients: sums over stages.
        total = jax.lax.psum((carry["loss"], carry["d_head"], carry["d_x"]), AXIS)
        return (*total, carry["d_weights"])

    args = (staged, real, rows, head, xs, segments)
    if mesh is None:
        loss, d_head, d_xs, d_staged = jax.vmap(on_stage, in_axes=(0, 0, 1, None, None, None),
                                                axis_name=AXIS)(*args)
        loss, d_head, d_xs = jax.tree.map(lambda a: a[0], (loss, d_head, d_xs))
    else:
        def per_rank(weights, mask, schedule, *rest):  # shard_map keeps the stage dimension, of size 1 here
            out = on_stage(*jax.tree.map(lambda a: a[0], (weights, mask)), schedule[:, 0], *rest)
            return (*out[:3], jax.tree.map(lambda a: a[None], out[3]))

        staged_spec = PartitionSpec(AXIS)
        loss, d_head, d_xs, d_staged = jax.shard_map(
            per_rank, mesh=mesh, axis_names=frozenset({AXIS}), check_vma=False,
            in_specs=(staged_spec, staged_spec, PartitionSpec(None, AXIS), PartitionSpec(), PartitionSpec(),
                      PartitionSpec()),
            out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(), staged_spec))(*args)
    d_x = d_xs.swapaxes(0, 1).reshape(x.shape)
    return loss, (unstage(d_staged)[0], d_head, d_x)
