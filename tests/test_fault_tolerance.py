"""Real faults on real `jaxscale train` processes: SIGKILL at a random step, SIGTERM / SIGINT, a damaged
newest checkpoint, a restart on fewer devices, NaN updates, and a 2-process run that is killed.

Every run here trains the same tiny model on the 8-device mesh data=2 x fsdp=2 x tensor=2 for 120 steps, with
a checkpoint every 10 steps; `reference` is that run without faults.

Tolerances:
- A restart on the same mesh is bitwise: same compiled program, same data for the same step, state restored
  bit for bit (checked against fingerprints), so every parameter and optimizer moment at the end is identical.
- A restart on 4 or 1 devices computes the same sums in another order (fewer, larger partial sums and more
  microbatches): losses within 1e-5 relative of the reference at every later step (measured: below 2e-7
  over 100 steps).
- Two processes add up gradients across processes through gloo, in another order than XLA does within one
  process: losses within 1e-5 relative, final parameters within 1e-4 (measured: 3e-5 after 120 steps at a
  learning rate of 2e-3).
"""
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import (
    checkpoint_is_finite,
    checkpoint_steps,
    free_port,
    host_arrays,
    logged_steps,
    overrides,
    restore_newest,
    run_train,
    start_train,
    wait_for,
)

from jaxscale.training.events import read_metrics
from jaxscale.training.preemption import EXIT_PREEMPTED

STEPS = 120
SETTINGS = ["mesh=cpu-8", f"train.steps={STEPS}", "checkpoint.every_steps=10", "checkpoint.keep_last=20",
            "train.elastic=true"]
LOSS_RTOL = 1e-5
MULTIPROCESS_PARAM_ATOL = 1e-4
SIGNAL_EXIT_BOUND_S = 20  # signal -> process gone; measured about 1 s on 2 loaded CPU cores


def metric_rows(run_dir) -> dict[int, dict]:
    """The training rows of metrics.jsonl by step, as the surviving run wrote them (events left out)."""
    return {row["step"]: row for row in read_metrics(run_dir / "metrics.jsonl")
            if "loss" in row and "event" not in row}


def losses(run_dir) -> dict[int, float]:
    return {step: row["loss"] for step, row in metric_rows(run_dir).items()}


def events(run_dir, name: str) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("event") == name]


def assert_bitwise_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    result = run_train(overrides(work / "run", *SETTINGS), work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.fixture(scope="module")
def reference_state(reference):
    return host_arrays(restore_newest(reference).state)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run SIGKILLed at a random step after its first checkpoint, never resumed (tests copy it)."""
    work = tmp_path_factory.mktemp("killed")
    run_dir = work / "run"
    kill_after = random.Random().randint(12, STEPS - 50)
    process, log_path = start_train(overrides(run_dir, *SETTINGS), work)
    wait_for(lambda: logged_steps(run_dir) >= kill_after and checkpoint_steps(run_dir), process, 300,
             f"step {kill_after}", log_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and STEPS not in checkpoint_steps(run_dir), \
        f"the run was meant to be killed at step {kill_after} of {STEPS}"
    return run_dir


def copy_run(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def test_a_run_killed_at_a_random_step_continues_to_the_same_bits(tmp_path, killed_run, reference,
                                                                  reference_state):
    run_dir = copy_run(killed_run, tmp_path)
    newest = checkpoint_steps(run_dir)[-1]
    result = run_train(overrides(run_dir, *SETTINGS), tmp_path)  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from checkpoint {run_dir / 'checkpoints' / str(newest)}" in result.stderr
    assert not list((run_dir / "checkpoints").glob("*tmp*"))  # a save the kill cut short is cleaned up
    assert_bitwise_equal(host_arrays(restore_newest(run_dir).state), reference_state)
    # metrics.jsonl logged the lost steps twice; read_metrics keeps the rerun's, all equal to the reference.
    assert losses(run_dir) == losses(reference)
    assert [row["step"] for row in events(run_dir, "resume")] == [newest]


@pytest.mark.parametrize("devices", [pytest.param(4, marks=pytest.mark.slow), 1])
def test_a_run_killed_on_8_devices_continues_on_fewer_with_the_same_loss_curve(tmp_path, devices, killed_run,
                                                                               reference):
    run_dir = copy_run(killed_run, tmp_path)
    newest = checkpoint_steps(run_dir)[-1]
    result = run_train(overrides(run_dir, *SETTINGS), tmp_path, devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    microbatches = {4: 2, 1: 4}[devices]  # 4 sequences per device per microbatch, as on 8 devices
    assert f"elastic: {devices} devices" in result.stderr
    assert f"train.microbatches 1 -> {microbatches} (4 sequences per device" in result.stderr
    expected, actual = losses(reference), losses(run_dir)
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in range(newest + 1, STEPS + 1):
        assert actual[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_run_still_ends_bitwise(
        tmp_path, reference, reference_state):
    run_dir = copy_run(reference, tmp_path)
    newest = run_dir / "checkpoints" / str(STEPS)
    for data_file in (p for p in (newest / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    result = run_train(overrides(run_dir, *SETTINGS), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    damaged_dir = run_dir / "checkpoints" / "damaged" / str(STEPS)
    assert f"checkpoint {newest} is damaged (array files damaged: " in result.stderr  # found before reading
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    assert f"moved it to {damaged_dir}" in result.stderr
    assert f"resuming from checkpoint {run_dir / 'checkpoints' / str(STEPS - 10)}" in result.stderr
    assert damaged_dir.is_dir()
    assert_bitwise_equal(host_arrays(restore_newest(run_dir).state), reference_state)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_preemption_signal_saves_the_current_step_and_exits_with_the_preempted_code(tmp_path, signum):
    run_dir = tmp_path / "run"
    settings = overrides(run_dir, "mesh=cpu-8", "train.steps=100000", "checkpoint.every_steps=0",
                         "checkpoint.every_minutes=0")
    process, log_path = start_train(settings, tmp_path)
    wait_for(lambda: logged_steps(run_dir) >= 5, process, 300, "step 5", log_path)
    signalled_at, sent = logged_steps(run_dir), time.monotonic()
    process.send_signal(signum)
    process.wait(timeout=120)
    elapsed = time.monotonic() - sent
    log = log_path.read_text()
    assert process.returncode == EXIT_PREEMPTED, log[-3000:]
    assert elapsed < SIGNAL_EXIT_BOUND_S
    assert f"{signal.Signals(signum).name} received: finishing this step" in log
    [preempted] = events(run_dir, "preempted")
    stopped_at = preempted["step"]
    assert signalled_at <= stopped_at <= signalled_at + 3  # the step in flight, not a later one
    assert checkpoint_steps(run_dir) == [stopped_at]
    assert int(restore_newest(run_dir).state.step) == stopped_at
    assert f"rerun the same command to continue (exit code {EXIT_PREEMPTED})" in log


NAN_AT = 15
NAN_SETTINGS = ["mesh=cpu-8", "train.steps=30", "checkpoint.every_steps=10", "checkpoint.keep_last=10",
                f"guards.inject_nan_at_step={NAN_AT}"]


@pytest.mark.slow
def test_an_injected_nan_is_skipped_or_rolled_back_and_never_saved(tmp_path):
    runs = {}
    for policy in ("skip", "rollback"):
        run_dir = tmp_path / policy
        result = run_train(overrides(run_dir, *NAN_SETTINGS, f"guards.on_nonfinite={policy}"), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"step {NAN_AT}: update skipped: nonfinite" in result.stderr
        [skipped] = events(run_dir, "update_skipped")
        assert skipped["step"] == NAN_AT and skipped["reason"] == "nonfinite"
        assert checkpoint_steps(run_dir) == [10, 20, 30]
        assert all(checkpoint_is_finite(run_dir, step) for step in checkpoint_steps(run_dir))
        runs[policy] = run_dir

    rows = metric_rows(runs["skip"])
    assert np.isnan(rows[NAN_AT]["loss"]) and rows[NAN_AT]["skip_reason"] == 1
    assert np.isfinite(rows[30]["loss"]) and rows[30]["skipped_updates"] == 1
    assert not events(runs["skip"], "rollback")

    [rollback] = events(runs["rollback"], "rollback")
    assert (rollback["step"], rollback["from_step"], rollback["skipped_batch"]) == (10, NAN_AT, NAN_AT - 1)
    assert [row["step"] for row in events(runs["rollback"], "batch_skipped")] == [NAN_AT]
    kept = losses(runs["rollback"])
    assert sorted(kept) == [s for s in range(1, 31) if s != NAN_AT] and all(np.isfinite(list(kept.values())))
    final = restore_newest(runs["rollback"])
    assert final.metadata.skipped_batches == [NAN_AT - 1]
    # The session's summary counts every step it trained: before the rollback 1-16 (the guard reads step 15's
    # loss once step 16 is dispatched), after it 11-30 less the skipped batch: 35 steps of 16 x 32 tokens.
    tokens_per_step = 16 * 32
    summaries = {policy: json.loads((run_dir / "summary.json").read_text()) for policy, run_dir in runs.items()}
    assert summaries["rollback"]["tokens"] == 35 * tokens_per_step
    assert summaries["skip"]["tokens"] == 30 * tokens_per_step
    # one clock for the session: step 10's row came before the rollback, the summary's end after it
    assert summaries["rollback"]["wall_s"] > metric_rows(runs["rollback"])[10]["elapsed_s"]
    # Rerunning the finished run trains nothing and leaves its summary as it was.
    again = run_train(overrides(runs["skip"], *NAN_SETTINGS, "guards.on_nonfinite=skip"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((runs["skip"] / "summary.json").read_text()) == summaries["skip"]

    # Both policies leave out the same update, and the rollback replays steps 11-14 exactly: equal ends.
    skip_state, rollback_state = host_arrays(restore_newest(runs["skip"]).state), host_arrays(final.state)
    for path in skip_state:
        if "skipped" not in path:  # the skip counter: 1 in the skip run; the rollback undid its own count
            np.testing.assert_array_equal(rollback_state[path], skip_state[path], err_msg=path)


def launch_two_processes(run_dir, tmp_path, tag: str, *extra: str):
    """Both processes of a 2-process job on localhost, 4 CPU devices each: one mesh of 8 devices."""
    port = free_port()
    return [start_train(overrides(run_dir, *SETTINGS), tmp_path, devices=4, log_name=f"{tag}{i}.log",
                        extra_args=("--coordinator", f"localhost:{port}", "--num-processes", "2",
                                    "--process-id", str(i), *extra))
            for i in range(2)]


def assert_two_processes_resume_to_the_reference(run_dir, tmp_path, newest, reference, reference_state):
    for process, log_path in launch_two_processes(run_dir, tmp_path, "resumed"):
        process.wait(timeout=400)
        assert process.returncode == 0, log_path.read_text()[-3000:]
        assert f"resuming from checkpoint {run_dir / 'checkpoints' / str(newest)}" in log_path.read_text()
    state_dir = run_dir / "checkpoints" / str(STEPS) / "state"
    assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()  # own shards
    expected, actual = losses(reference), losses(run_dir)
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
    final = host_arrays(restore_newest(run_dir).state)
    for path, value in reference_state.items():
        np.testing.assert_allclose(final[path], value, atol=MULTIPROCESS_PARAM_ATOL, err_msg=path)
    assert [row["step"] for row in events(run_dir, "resume")] == [newest]


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_two_processes_killed_together_resume_from_their_last_checkpoint(tmp_path, reference,
                                                                         reference_state):
    run_dir = tmp_path / "run"
    first = launch_two_processes(run_dir, tmp_path, "killed")
    wait_for(lambda: logged_steps(run_dir) >= 25 and checkpoint_steps(run_dir), first[0][0], 400, "step 25",
             first[0][1])
    for process, _ in first:  # the whole job is lost, as when a machine goes down
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert STEPS not in checkpoint_steps(run_dir)
    assert_two_processes_resume_to_the_reference(run_dir, tmp_path, checkpoint_steps(run_dir)[-1], reference,
                                                 reference_state)


HEARTBEAT_S = 5


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_when_one_of_two_processes_dies_the_other_exits_with_a_restart_code_and_a_restart_resumes(
        tmp_path, reference, reference_state, lost):
    """SIGKILL to one process. Process 1 lost: the survivor exits with code 76 within the heartbeat timeout (plus
    the time to notice), with one line naming the lost process and the newest checkpoint. Process 0 lost (the
    coordinator): JAX's own client ends the survivor at once with SIGABRT and its message, before the watchdog
    can speak (this JAX cannot hand that event to Python), a code launchers restart on as well. Both restarted,
    the run ends as the reference does."""
    run_dir = tmp_path / "run"
    first = launch_two_processes(run_dir, tmp_path, "lost", "--heartbeat-timeout", str(HEARTBEAT_S))
    wait_for(lambda: logged_steps(run_dir) >= 25 and checkpoint_steps(run_dir), first[0][0], 400, "step 25",
             first[0][1])
    first[lost][0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor, log_path = first[1 - lost]
    survivor.wait(timeout=120)
    waited = time.monotonic() - killed_at
    log = log_path.read_text()
    assert waited < 3 * HEARTBEAT_S + 10
    if lost == 1:
        assert survivor.returncode == 76, log[-3000:]
        [line] = [line for line in log.splitlines() if "was lost" in line]
        assert "jaxscale: process 1 of 2 was lost" in line and "Exiting with code 76" in line
        assert f"The newest checkpoint is {run_dir / 'checkpoints'}" in line
        assert "Traceback" not in log
    else:
        assert survivor.returncode == -signal.SIGABRT, log[-3000:]
        assert "Terminating process because the JAX distributed service detected fatal errors" in log
    first[lost][0].wait()
    assert_two_processes_resume_to_the_reference(run_dir, tmp_path, checkpoint_steps(run_dir)[-1], reference,
                                                 reference_state)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, reference, reference_state):
    """JAX's preemption service tells the other process; both save the same step and exit."""
    run_dir = tmp_path / "run"
    first = launch_two_processes(run_dir, tmp_path, "preempted")
    wait_for(lambda: logged_steps(run_dir) >= 25, first[0][0], 400, "step 25", first[0][1])
    first[1][0].send_signal(signal.SIGTERM)
    for process, log_path in first:
        process.wait(timeout=120)
        assert process.returncode == EXIT_PREEMPTED, log_path.read_text()[-3000:]
    [preempted] = events(run_dir, "preempted")
    assert checkpoint_steps(run_dir)[-1] == preempted["step"] < STEPS
    assert_two_processes_resume_to_the_reference(run_dir, tmp_path, preempted["step"], reference,
                                                 reference_state)


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_an_elastic_restart_may_need_more_microbatches_than_the_config_names(tmp_path):
    """6 devices at 12 x 2 microbatches (1 sequence per device each), then 4: the survivors need 3 microbatches,
    which the run picks itself; the configured 2 do not divide the batch over 4 devices."""
    run_dir = tmp_path / "run"
    settings = overrides(run_dir, "mesh.data=-1", "train.batch_size=12", "train.microbatches=2",
                         "train.elastic=true", "checkpoint.every_steps=2")
    first = run_train([*settings, "train.steps=2"], tmp_path, devices=6)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train([*settings, "train.steps=4"], tmp_path, devices=4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "train.microbatches 2 -> 3 (1 sequences per device" in second.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_local_launch_restarts_all_processes_when_one_is_lost(tmp_path, reference, lost):
    """`jaxscale train --num-processes 2`: both processes on this machine; one SIGKILLed, the other exits 76, and
    the launcher starts both again from the newest checkpoint; the run completes with the reference's losses."""
    run_dir = tmp_path / "run"
    launcher, log_path = start_train(overrides(run_dir, *SETTINGS), tmp_path, devices=4,
                                     extra_args=("--num-processes", "2", "--heartbeat-timeout", str(HEARTBEAT_S)))
    wait_for(lambda: logged_steps(run_dir) >= 25 and checkpoint_steps(run_dir), launcher, 400, "step 25", log_path)
    children = (Path("/proc") / str(launcher.pid) / "task" / str(launcher.pid) / "children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[lost]), signal.SIGKILL)
    launcher.wait(timeout=600)
    log = log_path.read_text()
    assert launcher.returncode == 0, log[-3000:]
    assert re.search(rf"process {lost} of 2 was lost first \(killed by SIGKILL\), the others stopped with codes "
                     rf"\[.*\]; the newest checkpoint is {re.escape(str(run_dir))}/checkpoints/\d+; restarting all 2 "
                     rf"\(1 of 3\)", log), log[-3000:]
    expected, actual = losses(reference), losses(run_dir)
    assert sorted(actual) == list(range(1, STEPS + 1))
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
