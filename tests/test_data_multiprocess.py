"""Two real JAX processes (4 CPU devices each) assemble the same global batch as one process reads alone."""
import os
import subprocess
import sys

import numpy as np
import pytest
from fault_helpers import free_port

from jaxscale.data import DataConfig, build_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO, "tests", "data_multiprocess_child.py")
STEP, BATCH, SEQ_LEN = 5, 16, 64


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "data-cache")  # same path in every data test module


def test_two_processes_assemble_the_one_process_batch(tmp_path, shared_cache):
    expected = build_dataset(DataConfig(), SEQ_LEN, cache_dir=shared_cache).batch(STEP, BATCH)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    outputs = [tmp_path / f"process{i}.npz" for i in range(2)]
    children = [subprocess.Popen([sys.executable, CHILD, str(i), str(port), shared_cache, str(out), str(STEP),
                                  str(BATCH), str(SEQ_LEN)], env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i, out in enumerate(outputs)]
    logs = []
    try:
        for child in children:
            logs.append(child.communicate(timeout=120)[0])
    finally:
        for child in children:
            child.kill()
    for child, log in zip(children, logs):
        assert child.returncode == 0, log[-3000:]
    for out in outputs:
        gathered = np.load(out)
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(gathered[key], expected[key])
