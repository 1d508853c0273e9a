"""Peak temporary memory per device (compiled memory analysis) and bubble of each pipeline schedule on 4
simulated CPU devices, one stage each, as the microbatch count grows at a fixed microbatch size; then the
compiled FLOPs of one chunk's forward, backward and split backward, and what each 1F1B-style schedule's ticks
cost when every tick lasts as long as the costliest op any stage runs in it.

GPipe and circular run as the trainer runs them (jax.value_and_grad of `pipelined_layers`), with
train.remat=full (each iteration keeps only its stage inputs) and GPipe also with remat=none (keeps every matmul
output); 1F1B, interleaved 1F1B and zb1p through `jaxscale.parallel.one_f_one_b.value_and_grad`, whose backward
recomputes each chunk from its stashed input as remat=full does (zb1p: both halves of its split backward). The layers are a tiny Llama's (d_model 64) at 256 tokens
per row, so per-microbatch activations dominate what a stage holds.

Usage: PYTHONPATH=$PWD python experiments/pipeline_schedule_memory.py [SCHEDULE ...]   (prints the tables;
~6 minutes on 2 cores; SCHEDULE: gpipe-none gpipe-full circular 1f1b interleaved zb1p, default all)
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jaxscale.model import Model, ModelConfig  # noqa: E402
from jaxscale.model.transformer import layer  # noqa: E402
from jaxscale.parallel import bubble_fraction, one_f_one_b, pipelined_layers, plan_pipeline  # noqa: E402
from jaxscale.parallel.plan import (  # noqa: E402
    BACKWARD,
    FORWARD,
    WEIGHTS,
    one_f_one_b_peak_stash,
    schedule_table,
    zb1p_bubble,
    zb1p_peak_stash,
)
from jaxscale.sharding import activation_rules  # noqa: E402

STAGES, LAYERS, ROWS, LENGTH = 4, 8, 2, 256


def tiny_llama(microbatches: int):
    """The layers' weights (shapes), the batch (shape), the head, apply_layer and the loss on the last layer."""
    cfg = ModelConfig.from_preset("tiny-llama", seq_len=LENGTH, n_layers=LAYERS)
    stack = jax.eval_shape(lambda: Model.build(cfg).init(jax.random.key(0))["blocks"])
    x = jax.ShapeDtypeStruct((microbatches * ROWS, LENGTH, cfg.d_model), jnp.float32)
    head = {"w": jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32)}

    def apply_layer(x, p, segment_ids):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return layer(cfg, p, x, positions, segment_ids, jnp.float32)

    def loss_fn(h, y, microbatch):
        return jnp.sum(jnp.sin(y * h["w"]))

    return stack, x, head, apply_layer, loss_fn


def temp_bytes(schedule: str, microbatches: int, remat: str = "full") -> int:
    stack, x, head, apply_layer, loss_fn = tiny_llama(microbatches)
    mesh = Mesh(np.array(jax.devices()[:STAGES]), ("pipeline",))
    repeats = 2 if schedule in ("circular", "interleaved") else 1
    plan = plan_pipeline(LAYERS, STAGES, microbatches, repeats)
    if schedule in ("1f1b", "interleaved", "zb1p"):
        table = schedule_table("interleaved_1f1b" if schedule == "interleaved" else schedule, STAGES,
                               microbatches, repeats)
        step = jax.jit(lambda s, h, x: one_f_one_b.value_and_grad(apply_layer, loss_fn, s, h, x, None, plan,
                                                                  table, mesh))
        compiled = step.lower(stack, head, x).compile()
    else:
        def loss(s, h, x):
            return loss_fn(h, pipelined_layers(apply_layer, s, x, None, plan, remat), 0)

        with activation_rules(mesh, {"layers": "pipeline"}):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(stack, head, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def op_flops(layers: int = LAYERS // STAGES) -> dict[str, float]:
    """Compiled FLOPs of one chunk (`layers` layers, one microbatch) per op, each backward recomputing
    the chunk's forward from its input as the executor does: forward, full backward (1F1B), and zb1p's input
    half and weights half."""
    stack, x, _, apply_layer, _ = tiny_llama(1)
    w = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape[1:]), a.dtype), stack)

    def chunk(w, x):
        return jax.lax.scan(lambda x, p: (apply_layer(x, p, None), None), x, w)[0]

    def pulled(wrt):  # the vjp of the chunk in those of its arguments (w, x) that `wrt` names
        def run(w, x, g):
            def of(*chosen):
                args = [w, x]
                for i, a in zip(wrt, chosen):
                    args[i] = a
                return chunk(*args)

            return jax.vjp(of, *((w, x)[i] for i in wrt))[1](g)

        return run

    ops = {"forward": (chunk, (w, x)), "backward": (pulled((0, 1)), (w, x, x)),
           "input half": (pulled((1,)), (w, x, x)), "weights half": (pulled((0,)), (w, x, x))}
    flops = {name: jax.jit(f).lower(*args).compile().cost_analysis()["flops"] for name, (f, args) in ops.items()}
    # The alternative: the input half keeps the chunk's vjp residuals and the weights half only pulls them.
    concrete = [jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), t) for t in (w, x)]
    residuals, tree = jax.tree.flatten(jax.vjp(chunk, *concrete)[1])
    kept = jax.jit(lambda residuals, g: jax.tree.unflatten(tree, residuals)(g)[0])
    flops["weights half, residuals kept"] = kept.lower(residuals, concrete[1]).compile().cost_analysis()["flops"]
    flops["residual bytes"] = sum(r.size * r.dtype.itemsize for r in residuals)
    return flops


def print_tick_costs() -> None:
    """Per schedule and microbatch count: the schedule's cost in chunk forwards when each tick lasts its
    costliest op (a scan of SPMD ticks waits for its slowest stage), against a stage's own work. zb1p as the
    executor runs it (both halves recompute the chunk from its input), and with the weights half costed as if
    the input half had kept the chunk's residuals for it."""
    flops = op_flops()
    forward = flops["forward"]
    print("FLOPs of one chunk's op, in chunk forwards:",
          ", ".join(f"{name} {value / forward:.2f}" for name, value in flops.items() if name != "residual bytes"))
    print(f"one chunk's vjp residuals: {flops['residual bytes'] / (ROWS * LENGTH * 64 * 4):.0f} activations")
    print(f"{'schedule':22} {'m':>3} {'ticks':>5} {'bubble':>7} {'tick-max cost':>13} {'work':>6} {'÷ 1f1b':>7}")
    for m in (4, 8, 16, 32):
        first = None
        for name, weights_half in (("1f1b", None), ("zb1p", "weights half"),
                                   ("zb1p, residuals kept", "weights half, residuals kept")):
            table = schedule_table(name.split(",")[0], STAGES, m)
            cost = np.zeros(4)
            cost[FORWARD] = forward
            cost[BACKWARD] = flops["input half" if table.split_backward else "backward"]
            cost[WEIGHTS] = flops[weights_half] if weights_half else 0
            ticks = cost[table.kind].max(axis=1).sum() / forward
            work = cost[table.kind[:, 0]].sum() / forward
            first = first or ticks
            print(f"{name:22} {m:>3} {table.ticks:>5} {table.bubble:>7.1%} {ticks:>13.1f} {work:>6.1f} "
                  f"{ticks / first:>7.2f}", flush=True)


def print_table(cases, temp_bytes) -> None:
    """One row per (schedule, remat, repeats, table) case and microbatch count 4, 8, 16: temp_bytes(schedule,
    m, remat), the growth per extra microbatch in activations, the bubble and the stash (the 1F1B-style
    schedules' peak, `table` naming their table; else all m x repeats microbatches)."""
    activation = ROWS * LENGTH * 64 * 4
    print(f"{STAGES} stages, {LAYERS} layers, microbatch {ROWS} x {LENGTH} tokens: one activation "
          f"{activation / 2**10:.0f} KiB")
    print(f"{'schedule, remat':24} {'m':>3} {'temp KiB':>9} {'per microbatch':>14} {'bubble':>7} {'stash':>6}")
    for schedule, remat, repeats, table in cases:
        first = None
        for m in (4, 8, 16):
            if table == "zb1p":
                stash, bubble = max(zb1p_peak_stash(STAGES, m)), zb1p_bubble(STAGES, m)
            else:
                stash = max(one_f_one_b_peak_stash(STAGES, m, repeats)) if table else repeats * m
                bubble = bubble_fraction(STAGES, m, repeats)
            size = temp_bytes(schedule, m, remat)
            first = first or (m, size)
            growth = "" if m == first[0] else f"{(size - first[1]) / (m - first[0]) / activation:.2f} act."
            print(f"{schedule + ', ' + remat:24} {m:>3} {size / 2**10:>9.0f} {growth:>14} "
                  f"{bubble:>7.1%} {stash:>6}", flush=True)


CASES = {"gpipe-none": ("gpipe", "none", 1, None), "gpipe-full": ("gpipe", "full", 1, None),
         "circular": ("circular", "full", 2, None), "1f1b": ("1f1b", "full", 1, "1f1b"),
         "interleaved": ("interleaved", "full", 2, "interleaved_1f1b"), "zb1p": ("zb1p", "full", 1, "zb1p")}


def main():
    print_table([CASES[name] for name in sys.argv[1:] or CASES], temp_bytes)
    print_tick_costs()


if __name__ == "__main__":
    main()
