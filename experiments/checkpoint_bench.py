"""What checkpointing costs a run: the step-time stall of an async save, and the time to restore.

    python experiments/checkpoint_bench.py                  # gpt2-124m and gpt2-350m (one GPU)
    python experiments/checkpoint_bench.py --tiny           # a tiny model, to check it runs (CPU)

For each model the training step of `jaxscale train` (same trainer, same data) is timed in windows of
--save-every steps, each ending with a device sync. The windows without a save come first; then windows that
each start with an async save of the full state, as the training loop does it: the loop pauses for the
state's fingerprint and its copy to host memory, and the write to disk runs in the background while the next
steps run (a save also waits for the previous one to finish). The stall of one save is the median window
with a save minus the median window without; divided by --save-every it is the cost per step at that save
interval. Then the newest checkpoint is restored onto the trainer's shardings and checked against its
fingerprints: the restore time. One JSON line per model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxscale.checkpointing import CheckpointStore
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.training import build_trainer
from jaxscale.training.loop import batch_shard, open_dataset, to_global
from jaxscale.training.trainer import run_info

TINY = ["model.seq_len=32", "model.n_layers=1", "model.d_model=32", "train.batch_size=8", "mesh.data=-1"]


def directory_bytes(path) -> int:
    """Bytes under a local directory (the store's paths are epath paths, whose glob refuses `**`)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_model(experiment: str, overrides: list[str], *, save_every: int, windows: int,
                directory: Path) -> dict:
    config = load_config(experiment, overrides + ["train.progress=false"])
    trainer = build_trainer(config)
    t = config.train
    dataset = open_dataset(config)
    warmup = 3
    step_count = warmup + 2 * windows * save_every
    # Batches are read before timing: the loader's own speed is measured by the data benchmark.
    shard = batch_shard(trainer.data_sharding, t.batch_size)
    batches = [to_global(dataset.batch(i, t.batch_size, **shard), trainer.data_sharding, t.batch_size)
               for i in range(step_count)]
    store = CheckpointStore(directory, CheckpointConfig(keep_last=2))
    info = run_info(trainer.plan, set(), data_rows=0)
    state = trainer.init_state()

    step = 0
    for _ in range(warmup):  # compiles the step
        state, metrics = trainer.train_step(state, batches[step])
        step += 1
    store.save(step, state, info)  # compiles the fingerprint; Orbax sets itself up
    store.wait()

    def window(save: bool) -> tuple[float, float]:
        """(seconds for the window, seconds the loop was blocked in save())."""
        nonlocal state, step
        start = time.perf_counter()
        blocked = 0.0
        if save:
            store.save(step, state, info)
            blocked = time.perf_counter() - start
        for _ in range(save_every):
            state, metrics = trainer.train_step(state, batches[step])
            step += 1
        jax.block_until_ready(metrics)
        return time.perf_counter() - start, blocked

    plain = [window(save=False)[0] for _ in range(windows)]
    with_save, blocked = zip(*(window(save=True) for _ in range(windows)))
    start = time.perf_counter()
    store.wait()
    drain_s = time.perf_counter() - start  # the last background write, still running after its window

    start = time.perf_counter()
    store.save(step, state, info)
    store.wait()
    save_s = time.perf_counter() - start  # one save from start to a finalized checkpoint

    start = time.perf_counter()
    restored = store.restore_newest(trainer.abstract_state())
    jax.block_until_ready(restored.state)
    restore_s = time.perf_counter() - start
    store.close()

    no_save_s, save_window_s = statistics.median(plain), statistics.median(with_save)
    stall_s = save_window_s - no_save_s
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(restored.state))
    return {
        "experiment": experiment,
        "params_m": round(trainer.model.param_count() / 1e6, 1),
        "state_gb": state_bytes / 1e9,
        "checkpoint_gb": directory_bytes(restored.path) / 1e9,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "save_every": save_every,
        "step_s": no_save_s / save_every,
        "step_s_in_save_windows": save_window_s / save_every,
        "stall_s_per_save": stall_s,
        "stall_s_per_step": stall_s / save_every,
        "stall_fraction": stall_s / no_save_s,
        "save_blocking_s": statistics.median(blocked),
        "save_s": save_s,
        "last_write_drain_s": drain_s,
        "restore_s": restore_s,
        "windows": windows,
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-124m", "gpt2-350m"], help="experiment names")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of --models (CPU check)")
    parser.add_argument("--save-every", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=6, help="timed windows with and without a save")
    parser.add_argument("--dir", help="where checkpoints go (default: a temporary folder, removed after)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every model, as for `jaxscale train`")
    args = parser.parse_args()
    runs = [("default", TINY)] if args.tiny else [(name, []) for name in args.models]
    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as scratch:
        root = Path(args.dir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        for experiment, overrides in runs:
            directory = Path(tempfile.mkdtemp(prefix=f"{experiment}-", dir=root))  # never an old run's steps
            result = bench_model(experiment, overrides + args.overrides, save_every=args.save_every,
                                 windows=args.windows, directory=directory)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
