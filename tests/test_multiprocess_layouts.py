"""Layouts whose model-parallel axes span processes: every process of a tensor (or pipeline) group must feed
the same rows, so the job trains exactly as one process holding all the devices does."""
import subprocess

import pytest
from fault_helpers import CLI, cli_args, environment, free_port, overrides

from jaxscale.training.events import read_metrics

STEPS = 3
LOSS_RTOL = 1e-5  # the same arithmetic; only the collectives' summation order may differ between processes


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row}


@pytest.mark.parametrize("mesh", [{"tensor": 2}, {"pipeline": 2}])
def test_a_model_parallel_axis_across_two_processes_trains_as_one_process(tmp_path, mesh):
    sets = [f"train.steps={STEPS}", "mesh.data=1", *(f"mesh.{axis}={size}" for axis, size in mesh.items()),
            "model.n_layers=2", "pipeline.microbatches=2"]
    one = subprocess.run(CLI + cli_args(overrides(tmp_path / "one", *sets)), capture_output=True, text=True,
                         env=environment(tmp_path, 2), cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    port = free_port()
    processes = [subprocess.Popen(
        CLI + cli_args(overrides(tmp_path / "two", *sets))
        + ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(tmp_path, 1), cwd=tmp_path)
        for i in range(2)]
    try:
        finished = [process.communicate(timeout=300) for process in processes]
    finally:  # a hung process must not outlive the test
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, finished):
        assert process.returncode == 0, stderr[-3000:]

    expected, actual = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(expected) == sorted(actual) == list(range(1, STEPS + 1))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
