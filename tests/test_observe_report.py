"""`jaxscale report` on a run directory laid out as training leaves it (two sessions, a crash between)."""
import json
import subprocess
import sys

from fault_helpers import REPO

from jaxscale.training.report import report


def rows_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_gives_steps_tokens_losses_goodput_stragglers_and_cost(tmp_path):
    (tmp_path / "config.yaml").write_text("train:\n  steps: 30\n")
    rows_file(tmp_path / "metrics.jsonl", [
        {"step": 0, "event": "start"},
        {"step": 10, "loss": 4.0, "tokens": 1000},
        {"step": 20, "loss": 3.5, "tokens": 2000},  # lost: the restart continues from step 10
        {"step": 10, "event": "resume"},
        {"step": 20, "loss": 3.4, "tokens": 1000},
        {"step": 20, "event": "straggler", "process": 1, "cause": "data", "windows": 3, "step_time_s": 0.2,
         "data_wait_s": 0.1, "load_s": 0.15, "median_step_time_s": 0.12, "median_data_wait_s": 0.01,
         "median_load_s": 0.08, "prefetch_depth": 4},
        {"step": 30, "loss": 3.0, "tokens": 2000},
        {"step": 30, "eval_loss": 3.1}])
    seconds = {"productive": 8.0, "compile": 1.0}
    rows_file(tmp_path / "goodput.jsonl", [
        {"attempt": "a", "kind": "start", "t": 0.0, "step": 0},
        {"attempt": "a", "kind": "end", "t": 10.0, "step": 30, "seconds": seconds}])
    (tmp_path / "summary.json").write_text(json.dumps(
        {"wall_s": 9.5, "chips": 8, "hardware": "h100-sxm", "cost_usd": 0.08, "price_usd_per_chip_hour": 3.9,
         "price_date": "2026-11", "energy_kwh": 0.002, "j_per_token": 3.6}))
    lines = report(tmp_path).splitlines()
    assert lines[0] == f"{tmp_path}: 30 steps of 30, 3,000 tokens, 1 restart"
    assert lines[1] == "loss 4.000 (step 10) -> 3.000 (step 30), eval loss 3.100 (step 30)"
    assert lines[2].startswith("goodput 80.0% (other 10.0%, compile 10.0%)")
    assert lines[3].startswith("straggler at step 20: process 1 is a straggler (data): per step step time 200.0 ms "
                               "(median 120.0), data wait 100.0 ms (median 10.0), load 150.0 ms (median 80.0)")
    assert lines[3].endswith("its data prefetch depth grows to 4")
    assert lines[4] == ("cost and energy: last session 9.5 s on 8 x h100-sxm, $0.08 at $3.9/chip-hour (2026-11), "
                        "0.002 kWh measured (3.6 J/token)")


def test_report_of_a_directory_without_a_run_exits_2_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jaxscale.cli", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2
    assert f"{tmp_path} holds no metrics.jsonl" in done.stderr and "Traceback" not in done.stderr
