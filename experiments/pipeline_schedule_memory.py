"""Peak temporary memory per device (compiled memory analysis) and bubble of each pipeline schedule on 4
simulated CPU devices, one stage each, as the microbatch count grows at a fixed microbatch size.

GPipe and circular run as the trainer runs them (jax.value_and_grad of `pipelined_layers`), with
train.remat=full (each iteration keeps only its stage inputs) and GPipe also with remat=none (keeps every matmul
output); 1F1B and interleaved 1F1B through `jaxscale.parallel.one_f_one_b.value_and_grad`, whose backward recomputes
each chunk from its stashed input as remat=full does. The layers are a tiny Llama's (d_model 64) at 256 tokens
per row, so per-microbatch activations dominate what a stage holds.

Usage: PYTHONPATH=$PWD python experiments/pipeline_schedule_memory.py   (prints a table; ~5 minutes on 2 cores)
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jaxscale.model import Model, ModelConfig  # noqa: E402
from jaxscale.model.transformer import layer  # noqa: E402
from jaxscale.parallel import bubble_fraction, one_f_one_b, pipelined_layers, plan_pipeline  # noqa: E402
from jaxscale.parallel.plan import one_f_one_b_peak_stash, one_f_one_b_table  # noqa: E402
from jaxscale.sharding import activation_rules  # noqa: E402

STAGES, LAYERS, ROWS, LENGTH = 4, 8, 2, 256


def temp_bytes(schedule: str, microbatches: int, remat: str = "full") -> int:
    cfg = ModelConfig.from_preset("tiny-llama", seq_len=LENGTH, n_layers=LAYERS)
    stack = jax.eval_shape(lambda: Model.build(cfg).init(jax.random.key(0))["blocks"])
    x = jax.ShapeDtypeStruct((microbatches * ROWS, LENGTH, cfg.d_model), jnp.float32)
    head = {"w": jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32)}
    mesh = Mesh(np.array(jax.devices()[:STAGES]), ("pipeline",))

    def apply_layer(x, p, segment_ids):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return layer(cfg, p, x, positions, segment_ids, jnp.float32)

    def loss_fn(h, y, microbatch):
        return jnp.sum(jnp.sin(y * h["w"]))

    repeats = 1 if schedule in ("gpipe", "1f1b") else 2
    plan = plan_pipeline(LAYERS, STAGES, microbatches, repeats)
    if schedule in ("1f1b", "interleaved"):
        table = one_f_one_b_table(STAGES, microbatches, repeats)
        step = jax.jit(lambda s, h, x: one_f_one_b.value_and_grad(apply_layer, loss_fn, s, h, x, None, plan,
                                                                  table, mesh))
        compiled = step.lower(stack, head, x).compile()
    else:
        def loss(s, h, x):
            return loss_fn(h, pipelined_layers(apply_layer, s, x, None, plan, remat), 0)

        with activation_rules(mesh, {"layers": "pipeline"}):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(stack, head, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def print_table(cases, temp_bytes) -> None:
    """One row per (schedule, remat, repeats, is 1F1B) case and microbatch count 4, 8, 16: temp_bytes(schedule,
    m, remat), the growth per extra microbatch in activations, the bubble and the stash (1F1B's peak, else all
    m x repeats microbatches)."""
    activation = ROWS * LENGTH * 64 * 4
    print(f"{STAGES} stages, {LAYERS} layers, microbatch {ROWS} x {LENGTH} tokens: one activation "
          f"{activation / 2**10:.0f} KiB")
    print(f"{'schedule, remat':24} {'m':>3} {'temp KiB':>9} {'per microbatch':>14} {'bubble':>7} {'stash':>6}")
    for schedule, remat, repeats, is_1f1b in cases:
        first = None
        for m in (4, 8, 16):
            stash = max(one_f_one_b_peak_stash(STAGES, m, repeats)) if is_1f1b else repeats * m
            size = temp_bytes(schedule, m, remat)
            first = first or (m, size)
            growth = "" if m == first[0] else f"{(size - first[1]) / (m - first[0]) / activation:.2f} act."
            print(f"{schedule + ', ' + remat:24} {m:>3} {size / 2**10:>9.0f} {growth:>14} "
                  f"{bubble_fraction(STAGES, m, repeats):>7.1%} {stash:>6}", flush=True)


def main():
    print_table([("gpipe", "none", 1, False), ("gpipe", "full", 1, False), ("circular", "full", 2, False),
                 ("1f1b", "full", 1, True), ("interleaved", "full", 2, True)], temp_bytes)


if __name__ == "__main__":
    main()
