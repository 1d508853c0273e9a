"""Context parallelism's two attentions side by side on 8 simulated CPU devices (mesh.context=8): the all-gather
of the keys and values, and the ring (`model.context_attention`).

1. Compiled memory per device of the trainer's whole train step at long lengths (one row, float32, packed
   documents on), for tiny-llama (d_model 64, 4 heads on 2 KV heads: 64 key and value numbers per token and
   layer) and a wider model whose heads all have their own keys (d_model 256, 8 heads, 8 KV heads: 512), where
   the gathered keys weigh more against the activations.
2. Bytes each rank receives in one layer's attention (forward + backward), read from the compiled program's
   collectives (their result shapes, times the trip counts of the loops around them) next to the formula
   (`jaxscale.parallel.context.bytes_moved_per_layer`).
3. Train step time of tiny-llama at a moderate length (median of the timed steps after one warm-up, the two
   taking turns).

Usage: PYTHONPATH=$PWD python experiments/context_long_memory.py [--lengths 8192 16384 32768 65536]
       [--time-length 8192] [--steps 5]                              (prints three tables)
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxscale.config import Config, MeshConfig, TrainConfig  # noqa: E402
from jaxscale.mesh import build_mesh  # noqa: E402
from jaxscale.model import ModelConfig  # noqa: E402
from jaxscale.parallel.context import IMPLEMENTATIONS, bytes_moved_per_layer, context_attention  # noqa: E402
from jaxscale.sharding import activation_rules  # noqa: E402
from jaxscale.training import build_trainer  # noqa: E402

CONTEXT = 8
MODELS = {"tiny-llama": {},
          "wide-mha": dict(d_model=256, n_heads=8, n_kv_heads=8, d_ff=512)}


def model_config(name: str, length: int, implementation: str) -> ModelConfig:
    return ModelConfig.from_preset("tiny-llama", seq_len=length, context_attention=implementation, **MODELS[name])


def trainer_for(name: str, length: int, implementation: str):
    config = Config(model=model_config(name, length, implementation), mesh=MeshConfig(data=1, context=CONTEXT),
                    train=TrainConfig(batch_size=1, compute_dtype="float32"))  # data.document_masking: on
    return build_trainer(config, jax.devices()[:CONTEXT])


def step_memory(name: str, length: int, implementation: str) -> tuple[float, float]:
    """(temp MiB per device, compile seconds) of the compiled train step."""
    trainer = trainer_for(name, length, implementation)
    spec = jax.ShapeDtypeStruct((1, length + 1), jnp.int32, sharding=trainer.data_sharding)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state(), {"tokens": spec, "segment_ids": spec}).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, time.perf_counter() - start


def step_seconds(length: int, steps: int) -> dict[str, float]:
    """Median train step seconds of each implementation, their steps taken in turns (A, B, A, B, ...) after one
    warm-up step each, so that load from other processes falls on both alike."""
    rng = np.random.default_rng(0)
    shape = (1, length + 1)
    batch = {"tokens": rng.integers(0, 257, shape, dtype=np.int32),
             "segment_ids": 1 + np.cumsum(rng.random(shape) < 1e-3, axis=1, dtype=np.int32)}
    runs = {}
    for i in IMPLEMENTATIONS:
        trainer = trainer_for("tiny-llama", length, i)
        state, _ = trainer.train_step(trainer.init_state(), jax.device_put(batch, trainer.data_sharding))
        runs[i] = [trainer, state, jax.device_put(batch, trainer.data_sharding), []]
    for _ in range(steps):
        for run in runs.values():
            trainer, state, placed, times = run
            start = time.perf_counter()
            run[1], metrics = trainer.train_step(state, placed)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    return {i: statistics.median(run[3]) for i, run in runs.items()}


# ----------------------------------------------------------------------------------------------------------
# Collective bytes from the compiled program

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(r"= (\([^=]*\)|\S+) (all-gather|reduce-scatter|collective-permute|all-reduce)(?:-start)?\(")
_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_WHILE = re.compile(r"while\(.*body=%([\w.\-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CALLS = re.compile(r"(?:calls|to_apply|branch_computations)=\{?%([\w.\-]+)")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def received_bytes(hlo: str) -> dict[str, float]:
    """Bytes one rank receives per execution of the program, by collective kind: all-gather (G - 1) / G of its
    result, reduce-scatter (G - 1) x its result, collective-permute its result, all-reduce 2 (G - 1) / G of it
    (ring algorithms), G the group size; groups of one are no communication. A collective in a loop counts
    its trip count times."""
    own: dict[str, list] = {}
    name = None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            name = head[1]
            own[name] = []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None:
            continue
        if (m := _COLLECTIVE.search(line)) and (g := _GROUPS.search(line) or "source_target_pairs" in line):
            size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in
                       _SHAPE.findall(m[1]))
            group = 2 if g is True else len(g[1].split(","))  # a permute: one sender per receiver
            factor = {"all-gather": (group - 1) / group, "reduce-scatter": group - 1, "collective-permute": 1,
                      "all-reduce": 2 * (group - 1) / group}[m[2]]
            if group > 1:
                own[name].append(("bytes", m[2], size * factor))
        elif w := _WHILE.search(line):
            own[name].append(("call", w[1], int(w[2])))
        else:
            own[name].extend(("call", callee, 1) for callee in _CALLS.findall(line))

    def total(computation: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, what, amount in own.get(computation, []):
            parts = {what: amount} if kind == "bytes" else {k: amount * v for k, v in total(what).items()}
            for k, v in parts.items():
                out[k] = out.get(k, 0.0) + v
        return out

    return total(entry)


def attention_layer_bytes(name: str, length: int, implementation: str) -> dict[str, float]:
    """received_bytes of the gradient of one layer's context attention (float32, packed documents)."""
    cfg = model_config(name, length, implementation).resolved()
    mesh_config = MeshConfig(data=1, context=CONTEXT)
    mesh = build_mesh(mesh_config, jax.devices()[:CONTEXT])
    rules = Config(mesh=mesh_config).sharding.activations
    q = jax.ShapeDtypeStruct((1, length, cfg.n_heads, cfg.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    rows = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, positions, segments):
        with activation_rules(mesh, rules):
            return context_attention(q, k, v, positions, segments, implementation).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return received_bytes(grad.lower(q, kv, kv, rows, rows).compile().as_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--time-length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "bytes", "time"])
    args = parser.parse_args()
    print(f"mesh.context={CONTEXT}, 1 row, float32, document masking on")
    if "memory" not in args.skip:
        print("\n1. train step temp MiB per device (compile s)")
        print(f"{'model':>10} {'tokens':>7} " + " ".join(f"{i:>18}" for i in IMPLEMENTATIONS))
        for name in MODELS:
            for length in args.lengths:
                cells = [step_memory(name, length, i) for i in IMPLEMENTATIONS]
                print(f"{name:>10} {length:>7} " + " ".join(f"{m:>10.1f} ({s:>4.0f} s)" for m, s in cells),
                      flush=True)
    if "bytes" not in args.skip:
        length = max(args.lengths)
        print(f"\n2. MiB each rank receives in one layer's attention, forward + backward, {length} tokens")
        print(f"{'model':>10} {'attention':>10} {'compiled program':>40} {'formula':>8}")
        for name in MODELS:
            cfg = model_config(name, length, "ring").resolved()
            for i in IMPLEMENTATIONS:
                measured = attention_layer_bytes(name, length, i)
                shown = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(measured.items()))
                formula = sum(bytes_moved_per_layer(length, CONTEXT, cfg.n_kv_heads, cfg.head_dim, 4, i))
                print(f"{name:>10} {i:>10} {shown:>40} {formula / 2**20:>8.2f}", flush=True)
    if "time" not in args.skip:
        print(f"\n3. tiny-llama train step at {args.time_length} tokens, median of {args.steps} steps")
        for i, seconds in step_seconds(args.time_length, args.steps).items():
            print(f"{i:>10} {seconds:.3f} s", flush=True)


if __name__ == "__main__":
    main()
