"""Stragglers: the rule on given figures, a deeper prefetch queue absorbing a bursty loader, and 2 real
processes, one slow to read its data."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from fault_helpers import REPO, environment, free_port

from jaxscale.data import Prefetcher
from jaxscale.observe.stragglers import StragglerConfig, StragglerMonitor, find_stragglers


class BurstyRows:
    """Batches that mostly load at once, every fourth one slowly: on average faster than the consumer."""

    def batch(self, step, batch_size, **_):
        if step % 4 == 3:
            time.sleep(0.24)
        return {"tokens": np.full((batch_size, 3), step, dtype=np.int32)}


def test_a_process_slow_to_load_or_waiting_on_its_data_is_a_data_straggler_one_slow_by_itself_compute():
    def figures(*rows):  # step time, data wait, load time per step
        return np.array(rows)

    assert find_stragglers(figures((0.1, 0, 0.01), (0.1, 0.05, 0.01), (0.1, 0, 0.01)), 0.2) == {1: "data"}
    assert find_stragglers(figures((0.1, 0, 0.01), (0.1, 0, 0.09), (0.1, 0, 0.01)), 0.2) == {1: "data"}
    assert find_stragglers(figures((0.1, 0, 0.01), (0.1, 0, 0.01), (0.15, 0, 0.01)), 0.2) == {2: "compute"}
    assert find_stragglers(figures((0.1, 0, 0.01), (0.1, 0.01, 0.02), (0.1, 0, 0.01)), 0.2) == {}  # 10 ms: < 20%


def test_one_process_is_no_comparison_and_the_monitor_stays_off():
    monitor = StragglerMonitor(StragglerConfig(every=1), process_count=1, prefetch_depth=2)
    monitor.push(1.0)
    with Prefetcher(BurstyRows(), 0, 2, depth=1) as batches:
        assert monitor.check(1, batches) is None and monitor.reports == []


def waits(prefetcher: Prefetcher, steps: int, step_s: float) -> float:
    total = 0.0
    for _ in range(steps):
        _, _, wait = next(prefetcher)
        total += wait
        time.sleep(step_s)  # the step
    return total


def test_a_deeper_prefetch_queue_absorbs_a_bursty_loader_that_a_shallow_one_waits_on():
    with Prefetcher(BurstyRows(), 0, 2, depth=1) as shallow:
        shallow_wait = waits(shallow, 24, 0.08)
    with Prefetcher(BurstyRows(), 0, 2, depth=1) as grown:
        grown.set_depth(8)  # as a straggler report grows it
        grown_wait = waits(grown, 24, 0.08)
    # depth 1 (and the batch in the loader's hands): each slow batch costs ~0.24 - 2 x 0.08 s of waiting, 6 of
    # them (measured 0.47 s); depth 8 is ahead by more than a slow batch's load (measured under 1 ms)
    assert shallow_wait > 0.3 and grown_wait < shallow_wait / 4, (shallow_wait, grown_wait)


@pytest.mark.slow  # two real training processes
def test_two_processes_one_slow_to_read_its_data_is_reported_and_its_prefetch_grows(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    processes = [subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "straggler_child.py"), str(i), str(port), str(run_dir), "1", "0.03"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(tmp_path, 4), cwd=tmp_path)
        for i in range(2)]
    try:
        finished = [process.communicate(timeout=400) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, finished):
        assert process.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reports = [r for r in rows if r.get("event") == "straggler"]
    assert reports and {r["process"] for r in reports} == {1}, reports
    first = reports[0]
    assert first["cause"] == "data" and first["prefetch_depth"] == 4 and first["step"] == 10
    assert first["load_s"] > first["median_load_s"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stragglers"][0]["process"] == 1
    for _, stderr in finished:  # every process logs the warning, and grows process 1's depth alike
        assert "process 1 is a straggler (data)" in stderr and "prefetch depth grows to 4" in stderr
