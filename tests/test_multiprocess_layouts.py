"""Layouts whose model-parallel axes span processes: every process of a tensor (or pipeline) group must feed
the same rows, so the job trains exactly as one process holding all the devices does."""
import subprocess

import pytest
from fault_helpers import CLI, cli_args, environment, overrides, run_two_processes

from jaxscale.training.events import read_metrics

STEPS = 3
LOSS_RTOL = 1e-5  # the same arithmetic; only the collectives' summation order may differ between processes


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row}


@pytest.mark.parametrize("mesh", [pytest.param({"tensor": 2}, marks=pytest.mark.slow), {"pipeline": 2}])
def test_a_model_parallel_axis_across_two_processes_trains_as_one_process(tmp_path, mesh):
    sets = [f"train.steps={STEPS}", "mesh.data=1", *(f"mesh.{axis}={size}" for axis, size in mesh.items()),
            "model.n_layers=2", "pipeline.microbatches=2"]
    one = subprocess.run(CLI + cli_args(overrides(tmp_path / "one", *sets)), capture_output=True, text=True,
                         env=environment(tmp_path, 2), cwd=tmp_path, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    run_two_processes(CLI + cli_args(overrides(tmp_path / "two", *sets)), tmp_path, devices=1)

    expected, actual = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(expected) == sorted(actual) == list(range(1, STEPS + 1))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
