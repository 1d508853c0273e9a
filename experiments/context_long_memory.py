"""Compiled memory per device of a training step with the sequence split over the `context` axis, on 8
simulated CPU devices: the tiny Llama (2 layers, d_model 64, 4 heads, 2 KV heads) at 8k, 16k and 32k tokens
per row, one row, packed documents on (segment ids), mesh.context=8. Attention runs block by block over the
gathered keys (`jaxscale.parallel.blockwise_attention`), so memory should grow linearly with the length; the
(own length x length) score matrix of XLA's form would take length^2 / 8 x 4 heads x 4 bytes per rank (2 GiB
at 32k) per layer.

Usage: PYTHONPATH=$PWD python experiments/context_long_memory.py   (prints a table)
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxscale.config import Config, MeshConfig, TrainConfig  # noqa: E402
from jaxscale.model import ModelConfig  # noqa: E402
from jaxscale.training import build_trainer  # noqa: E402

CONTEXT = 8


def step_memory(length: int) -> tuple[float, float, float, float]:
    """(temp, arguments, outputs MiB per device, compile seconds) of the compiled train step."""
    model = ModelConfig.from_preset("tiny-llama", seq_len=length)
    config = Config(model=model, mesh=MeshConfig(data=1, context=CONTEXT),
                    train=TrainConfig(batch_size=1, compute_dtype="float32"))  # data.document_masking: on
    trainer = build_trainer(config, jax.devices()[:CONTEXT])
    spec = jax.ShapeDtypeStruct((1, length + 1), jnp.int32, sharding=trainer.data_sharding)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state(), {"tokens": spec, "segment_ids": spec}).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return (m.temp_size_in_bytes / 2**20, m.argument_size_in_bytes / 2**20, m.output_size_in_bytes / 2**20,
            seconds)


def main():
    print(f"mesh.context={CONTEXT}, tiny-llama, 1 row, float32, document masking on")
    print(f"{'tokens':>7} {'temp MiB':>9} {'args MiB':>9} {'out MiB':>8} {'compile s':>10}")
    for length in (8192, 16384, 32768):
        temp, args, out, seconds = step_memory(length)
        print(f"{length:>7} {temp:>9.1f} {args:>9.1f} {out:>8.1f} {seconds:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
