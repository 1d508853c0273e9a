"""experiments/checkpoint_bench.py runs end to end (with --tiny on the CPU) and reports what it promises."""
import json
import subprocess
import sys

import pytest
from fault_helpers import REPO, environment

KEYS = {"params_m", "state_gb", "checkpoint_gb", "step_s", "step_s_in_save_windows", "stall_s_per_save",
        "stall_s_per_step", "stall_fraction", "save_blocking_s", "save_s", "restore_s"}


@pytest.mark.slow
def test_the_checkpoint_benchmark_prints_one_json_line_with_stall_and_restore_times(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "checkpoint_bench.py"), "--tiny",
                             "--windows", "2", "--save-every", "3", "--dir", str(tmp_path / "checkpoints")],
                            capture_output=True, text=True, env=environment(tmp_path, devices=1),
                            cwd=tmp_path, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()
    report = json.loads(line)
    assert KEYS <= report.keys() and report["save_every"] == 3 and report["devices"] == 1
    assert report["step_s"] > 0 and report["save_blocking_s"] > 0 and report["restore_s"] > 0
    assert report["checkpoint_gb"] > 0.5 * report["state_gb"] > 0  # the full state went to disk
    assert report["stall_s_per_step"] == report["stall_s_per_save"] / 3
