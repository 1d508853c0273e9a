"""Peak temporary memory per device of the trainer's compiled train step (`memory_analysis()`) for each
`pipeline.schedule`, on 4 simulated CPU devices, one stage each, as the microbatch count grows at a fixed
microbatch size: the whole step (embedding, output head, loss, AdamW update) as `jaxscale train` compiles it.

The model is a tiny Llama (8 layers, d_model 64) at 256 tokens per row, microbatches of 2 rows, float32, so
per-microbatch activations dominate what a stage holds. GPipe runs with train.remat=none (keeps every matmul
output) and full; circular with full; 1F1B, interleaved 1F1B and zb1p recompute each chunk in its backward
whatever train.remat says.

Usage: PYTHONPATH=$PWD python experiments/pipeline_trainer_memory.py [SCHEDULE ...]   (prints a table; ~12
minutes on 2 cores; SCHEDULE: a pipeline.schedule, default all)
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from pipeline_schedule_memory import LAYERS, LENGTH, ROWS, STAGES, print_table  # noqa: E402  (this folder)

from jaxscale.config import Config, MeshConfig, TrainConfig  # noqa: E402
from jaxscale.model import ModelConfig  # noqa: E402
from jaxscale.parallel import PipelineConfig  # noqa: E402
from jaxscale.parallel.plan import ONE_F_ONE_B_SCHEDULES  # noqa: E402
from jaxscale.training import build_trainer  # noqa: E402

CASES = (("gpipe", "none"), ("gpipe", "full"), ("circular", "full"), ("1f1b", "none"),
         ("interleaved_1f1b", "none"), ("zb1p", "none"))


def temp_bytes(schedule: str, microbatches: int, remat: str) -> int:
    model = ModelConfig.from_preset("tiny-llama", seq_len=LENGTH, n_layers=LAYERS)
    config = Config(model=model, mesh=MeshConfig(data=1, pipeline=STAGES),
                    train=TrainConfig(batch_size=ROWS * microbatches, compute_dtype="float32", remat=remat),
                    pipeline=PipelineConfig(schedule=schedule, microbatches=microbatches, repeats=2))
    trainer = build_trainer(config, jax.devices()[:STAGES])
    batch = {"tokens": jax.ShapeDtypeStruct((ROWS * microbatches, LENGTH + 1), jax.numpy.int32,
                                            sharding=trainer.data_sharding),
             "segment_ids": jax.ShapeDtypeStruct((ROWS * microbatches, LENGTH + 1), jax.numpy.int32,
                                                 sharding=trainer.data_sharding)}
    compiled = trainer.train_step.lower(trainer.abstract_state(), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    chosen = [case for case in CASES if case[0] in sys.argv[1:]] or CASES
    print_table([(schedule, remat, 2 if schedule in ("circular", "interleaved_1f1b") else 1,
                  schedule if schedule in ONE_F_ONE_B_SCHEDULES else None) for schedule, remat in chosen],
                temp_bytes)


if __name__ == "__main__":
    main()
