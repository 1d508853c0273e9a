"""The goodput account: by hand on records, and on a real run SIGKILLed after a checkpoint and resumed."""
import json
import signal
import subprocess
import sys

import pytest
from fault_helpers import REPO, checkpoint_steps, logged_steps, overrides, run_train, start_train, wait_for

from jaxscale.observe.goodput import GOODPUT_FILE, account, describe


def totals(productive, **other):
    return {"productive": productive, "compile": 0.0, "startup": 0.0, "restore": 0.0, "data_wait": 0.0,
            "checkpoint": 0.0, "eval": 0.0, "profile": 0.0, **other}


def test_a_crashed_attempts_work_past_the_resumed_checkpoint_is_lost_and_the_gap_is_restart(tmp_path):
    crashed = [
        {"attempt": "a", "kind": "start", "t": 100.0, "step": 0},
        {"attempt": "a", "kind": "progress", "t": 102.0, "step": 0, "seconds": totals(0.0, compile=2.0)},
        {"attempt": "a", "kind": "checkpoint", "t": 106.0, "step": 10,
         "seconds": totals(3.0, compile=2.0, checkpoint=1.0)},
        {"attempt": "a", "kind": "progress", "t": 110.0, "step": 15,
         "seconds": totals(7.0, compile=2.0, checkpoint=1.0)}]
    resumed = [
        {"attempt": "b", "kind": "start", "t": 115.0, "step": 10},
        {"attempt": "b", "kind": "end", "t": 125.0, "step": 20, "seconds": totals(6.0, compile=1.0, restore=2.0)}]
    half_written = '{"attempt": "a", "kind": "progr\n'  # the kill came in the middle of a line
    (tmp_path / GOODPUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in crashed) + half_written
                                         + "".join(json.dumps(r) + "\n" for r in resumed))
    result = account(tmp_path)
    s = result["seconds"]
    assert result["attempts"] == 2
    assert s["lost"] == pytest.approx(4.0)  # productive 7 s at step 15, 3 s at the checkpoint of step 10
    assert s["productive"] == pytest.approx(3.0 + 6.0)
    assert s["restart"] == pytest.approx(5.0)  # from the last record at t=110 to the restart at t=115
    assert s["compile"] == pytest.approx(3.0) and s["restore"] == pytest.approx(2.0)
    assert s["other"] == pytest.approx((10.0 - 10.0) + (10.0 - 9.0))
    assert result["total_s"] == pytest.approx(25.0)  # t=100 to t=125
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert describe(result).startswith("goodput 36.0% (restart 20.0%, lost 16.0%, compile 12.0%, ")


def test_no_records_is_no_account(tmp_path):
    assert account(tmp_path) is None


@pytest.mark.slow  # two real training processes
def test_goodput_of_a_run_sigkilled_and_resumed_counts_lost_work_and_sums_to_100(tmp_path):
    run_dir = tmp_path / "run"
    settings = overrides(run_dir, "train.steps=40", "checkpoint.every_steps=10", "checkpoint.async_save=false")
    process, log_path = start_train(settings, tmp_path)
    wait_for(lambda: 10 in checkpoint_steps(run_dir) and logged_steps(run_dir) >= 16, process, 300,
             "step 16 after the checkpoint of step 10", log_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done = run_train(settings, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    goodput = json.loads((run_dir / "summary.json").read_text())["goodput"]
    resumed_from = [json.loads(line) for line in (run_dir / GOODPUT_FILE).read_text().splitlines()
                    if '"start"' in line][-1]["step"]
    assert resumed_from >= 10 and goodput["attempts"] == 2
    assert goodput["seconds"]["lost"] > 0 and goodput["seconds"]["restart"] > 0
    assert goodput["seconds"]["compile"] > 0 and goodput["seconds"]["restore"] > 0
    assert 0 < goodput["goodput"] < 1
    assert sum(goodput["shares"].values()) == pytest.approx(1.0)
    assert "goodput " in done.stderr and "lost " in done.stderr
    shown = subprocess.run([sys.executable, "-m", "jaxscale.cli", "report", str(run_dir)], capture_output=True,
                           text=True, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert f"{run_dir}: 40 steps of 40" in shown.stdout and "1 restart" in shown.stdout
    assert "over 2 attempts" in shown.stdout
