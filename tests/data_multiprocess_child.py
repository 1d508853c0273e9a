"""One process of the 2-process data test (run by tests/test_data_multiprocess.py, not collected by pytest).

usage: data_multiprocess_child.py PROCESS_ID PORT CACHE_DIR OUT_NPZ STEP BATCH SEQ_LEN
Reads this process's rows of the global batch, assembles the global array over a mesh of all devices of both
processes (4 CPU devices each) with the batch sharded over every device, gathers it and saves it to OUT_NPZ.
"""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.data import DataConfig, build_dataset


def main() -> None:
    process_id, port, cache_dir, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    step, batch_size, seq_len = (int(a) for a in sys.argv[5:8])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8

    ds = build_dataset(DataConfig(), seq_len, cache_dir=cache_dir)
    local = ds.batch(step, batch_size, shard_index=jax.process_index(), shard_count=jax.process_count())
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    gathered = {}
    for name, rows in local.items():
        global_array = jax.make_array_from_process_local_data(sharding, rows)
        assert global_array.shape == (batch_size, seq_len + 1)
        gathered[name] = multihost_utils.process_allgather(global_array, tiled=True)
    np.savez(out_path, **gathered)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
