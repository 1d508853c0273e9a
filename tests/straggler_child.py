"""One process of the 2-process straggler test (run by tests/test_observe_stragglers.py, not collected by pytest).

usage: straggler_child.py PROCESS_ID PORT RUN_DIR SLOW_PROCESS ROW_DELAY_S
Trains a tiny model on random token rows through jaxscale.train; the process SLOW_PROCESS sleeps ROW_DELAY_S
before each row it reads, so its data loading falls behind the step.
"""
import sys
import time

import jax
import numpy as np

from jaxscale.config import load_config
from jaxscale.distributed import initialize
from jaxscale.training import train


class TokenRows:
    """Random-access rows of random tokens (seq_len + 1 each); slow to read where `delay_s` > 0."""

    def __init__(self, count: int, seq_len: int, delay_s: float):
        self.rows = np.random.default_rng(0).integers(0, 256, (count, seq_len + 1), dtype=np.int32)
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        time.sleep(self.delay_s)
        return {"tokens": self.rows[index], "segment_ids": np.ones_like(self.rows[index])}  # one document a row


def main() -> None:
    process_id, port, run_dir, slow_process, delay_s = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                                        int(sys.argv[4]), float(sys.argv[5]))
    initialize(f"localhost:{port}", 2, process_id)
    config = load_config(None, [
        f"run_dir={run_dir}", "model.preset=tiny", "model.seq_len=32", "model.n_layers=1", "model.d_model=32",
        "model.n_heads=4", "train.batch_size=8", "train.steps=40", "train.log_every=5", "train.eval_every=0",
        "train.progress=false", "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "data.prefetch=2",
        "stragglers.every=5", "stragglers.windows=2", "stragglers.threshold=0.2"])
    train(config, data=TokenRows(512, 32, delay_s if jax.process_index() == slow_process else 0.0))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
