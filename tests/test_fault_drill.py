"""experiments/fault_drill.py on CPU devices: 4 real processes stopped by a real signal, then continued."""
import json
import subprocess
import sys

import pytest
from fault_helpers import REPO, environment


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["elastic", "preempt"])
def test_the_fault_drill_stops_four_processes_and_the_restart_finishes_the_run(kind, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "fault_drill.py"), kind,
                             str(tmp_path / "drill"), "--cpu", "--timeout", "300"],
                            capture_output=True, text=True, env=environment(tmp_path, devices=1), cwd=tmp_path,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] and report["final_step"] == 200
    if kind == "elastic":
        assert report["exit_codes"] == [-9] * 4 and report["resumed_from_step"] <= report["signalled_after_step"]
        assert "fsdp=2" in report["elastic"] and "microbatches 1 -> 2" in report["elastic"]
        # float32 on CPU: the steps retrained on 2 devices give the killed 4-process run's losses
        assert report["retrained_steps"] > 0 and report["max_relative_loss_difference"] < 1e-5
    else:
        assert report["exit_codes"] == [75] * 4
        assert report["resumed_from_step"] == report["preempted_at_step"][0] >= report["signalled_after_step"]
