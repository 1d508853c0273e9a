"""The small decisions behind fault tolerance: refitting the mesh, microbatches for a shrunken mesh, when to
save, and reading metrics.jsonl across restarts."""
import json

import pytest

from jaxscale.checkpointing.schedule import SaveSchedule
from jaxscale.config import CheckpointConfig, ConfigError, MeshConfig, load_config
from jaxscale.training.elastic import adapt_to_devices, fit_mesh, microbatches_for
from jaxscale.training.events import read_metrics


def test_a_mesh_that_fits_is_kept():
    assert fit_mesh(MeshConfig(data=-1, tensor=2), 4) == MeshConfig(data=-1, tensor=2)


@pytest.mark.parametrize("devices, expected", [
    (4, MeshConfig(data=1, fsdp=2, tensor=2)),  # model-parallel axes kept, the data axis shrinks
    (2, MeshConfig(data=1, fsdp=1, tensor=2)),
    (1, MeshConfig(data=1, fsdp=1, tensor=1)),
    (16, MeshConfig(data=4, fsdp=2, tensor=2)),  # growing too
])
def test_the_8_device_mesh_is_refit_from_the_innermost_axis_out(devices, expected):
    assert fit_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices) == expected


def test_microbatches_keep_the_per_device_batch():
    assert microbatches_for(batch_size=16, batch_shards=4, target_per_device=4) == 1
    assert microbatches_for(batch_size=16, batch_shards=2, target_per_device=4) == 2
    assert microbatches_for(batch_size=16, batch_shards=1, target_per_device=4) == 4
    assert microbatches_for(batch_size=16, batch_shards=8, target_per_device=4) == 1  # more devices: smaller


def test_an_impossible_split_names_the_numbers():
    with pytest.raises(ConfigError, match="global batch of 16 cannot be split evenly over 3 batch shards"):
        microbatches_for(batch_size=16, batch_shards=3, target_per_device=4)


def test_an_elastic_restart_on_fewer_devices_says_what_changed():
    config = load_config(None, ["mesh=cpu-8", "train.batch_size=16", "train.elastic=true"])
    adapted, note = adapt_to_devices(config, 1, target_per_device=4)
    assert adapted.mesh == MeshConfig(data=1, fsdp=1, tensor=1) and adapted.train.microbatches == 4
    assert adapted.train.batch_size == 16
    assert "train.microbatches 1 -> 4" in note and "global batch 16 unchanged" in note
    assert adapt_to_devices(config, 8, target_per_device=4) == (config, None)


class Clock:
    """Time that moves only when told, so the time rule can be tested without waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_saves_come_every_n_steps_and_every_m_minutes_whichever_is_first():
    clock = Clock()
    schedule = SaveSchedule(CheckpointConfig(every_steps=10, every_minutes=1.0), clock)
    assert [s for s in range(1, 21) if schedule.due(s)] == [10, 20]
    clock.now = 61.0
    assert schedule.due(21)
    schedule.saved()
    clock.now = 100.0
    assert not schedule.due(22)
    assert SaveSchedule(CheckpointConfig(every_steps=0, every_minutes=0), clock).due(10) is False


def test_read_metrics_keeps_each_step_once_from_the_run_that_kept_it(tmp_path):
    rows = [{"step": 0, "event": "start"}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
            {"step": 2, "event": "checkpoint"}, {"step": 3, "loss": 3.5},  # killed after step 3
            {"step": 2, "event": "resume"}, {"step": 3, "loss": 3.4}, {"step": 4, "loss": 3.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in kept if "loss" in r] == [(1, 5.0), (2, 4.0), (3, 3.4), (4, 3.0)]
    assert [r["event"] for r in kept if "event" in r] == ["start", "checkpoint", "resume"]


def test_evaluation_without_validation_data_is_refused_before_the_run_writes_anything(tmp_path):
    from jaxscale.training import train

    run_dir = tmp_path / "run"
    config = load_config(None, [f"run_dir={run_dir}", "data.validation_fraction=0", "train.eval_every=5"])
    with pytest.raises(ConfigError, match="train.eval_every=0"):
        train(config)
    assert not run_dir.exists()


def test_a_resume_refused_for_a_changed_model_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    """Every check, the restore of the checkpoint included, runs before anything in the run directory changes."""
    from fault_helpers import TINY, cli_args

    from jaxscale.cli import main

    run_dir = tmp_path / "run"
    settings = [*TINY, f"run_dir={run_dir}", "train.steps=3"]
    assert main(["train", *cli_args(settings)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["train", *cli_args([*settings, "train.steps=6", "model.d_model=64"])]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_preempted_runs_summary_counts_every_step_it_trained(tmp_path):
    """SIGTERM between two log rows (one every 4 steps): summary.json counts up to the step that was saved."""
    import json
    import os
    import signal
    import threading
    import time

    from fault_helpers import TINY, logged_steps

    import jaxscale

    run_dir = tmp_path / "run"
    config = jaxscale.load_config(None, [*TINY, f"run_dir={run_dir}", "train.steps=100000", "train.log_every=4",
                                         "checkpoint.every_steps=0", "checkpoint.every_minutes=0"])

    def preempt_after_step_5():
        while logged_steps(run_dir) < 5:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt_after_step_5, daemon=True).start()
    result = jaxscale.train(config)
    assert result.preempted
    saved = int(result.state.step)
    assert json.loads((run_dir / "summary.json").read_text())["tokens"] == saved * 16 * 32


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_directory_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    import signal

    from fault_helpers import TINY, cli_args, logged_steps, start_train, wait_for

    from jaxscale.cli import main

    run_dir = tmp_path / "run"
    settings = [*TINY, f"run_dir={run_dir}", "train.steps=100000", "checkpoint.every_steps=5"]
    process, log_path = start_train(settings, tmp_path)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3, process, 300, "step 3", log_path)
        metrics_before = (run_dir / "metrics.jsonl").stat().st_size
        assert main(["train", *cli_args(settings)]) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by another jaxscale run (pid {process.pid} on " in err
        assert process.poll() is None  # the holder trains on
        assert (run_dir / "metrics.jsonl").stat().st_size >= metrics_before
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # the OS dropped the killed holder's lock: the same command continues the run
    assert main(["train", *cli_args([*settings[:-2], "train.steps=8", "checkpoint.every_steps=5"])]) == 0


@pytest.mark.slow
def test_a_resume_with_another_batch_size_continues_at_the_example_it_had_reached(tmp_path):
    """6 steps of 16 rows, then 2 of 32: the resumed run reads rows 96-159, none skipped or repeated, and says
    so with a warning and an event row."""
    import numpy as np
    from fault_helpers import TINY

    import jaxscale
    from jaxscale.data import build_dataset
    from jaxscale.training.events import read_metrics
    from jaxscale.training.trainer import checkpoint_dir

    run_dir = tmp_path / "run"
    first = jaxscale.load_config(None, [*TINY, f"run_dir={run_dir}", "train.steps=6"])
    jaxscale.train(first)
    second = jaxscale.load_config(None, [*TINY, f"run_dir={run_dir}", "train.steps=8", "train.batch_size=32"])
    jaxscale.train(second)
    [changed] = [row for row in read_metrics(run_dir) if row.get("event") == "batch_size_changed"]
    assert (changed["step"], changed["old"], changed["new"], changed["data_rows"]) == (6, 16, 32, 96)
    store = jaxscale.checkpointing.CheckpointStore(checkpoint_dir(second), second.checkpoint)
    assert store.newest_metadata().data_rows == 96 + 2 * 32
    store.close()
    # the rows of step 6 at 32 per batch, offset by 96 - 6 x 32, are steps 6 and 7 at 16 per batch
    ds = build_dataset(first.data, first.model.seq_len)
    resumed = ds.batch(6, 32, row_offset=96 - 6 * 32)
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], np.concatenate([ds.batch(6, 16)[key], ds.batch(7, 16)[key]]))


@pytest.mark.slow
def test_training_a_finished_run_again_returns_its_recorded_metrics(tmp_path):
    """Rerunning a notebook cell: the run is complete, nothing trains, and the result holds the recorded rows."""
    from fault_helpers import TINY

    import jaxscale

    config = jaxscale.load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", "train.steps=4"])
    first = jaxscale.train(config)
    again = jaxscale.train(config)
    assert [r["step"] for r in again.metrics if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in again.metrics if "loss" in r] == [r["loss"] for r in first.metrics if "loss" in r]
    assert int(again.state.step) == 4
    # the same cell with another learning rate: not that run's results
    other = jaxscale.load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", "train.steps=4",
                                        "optimizer.learning_rate=0.01", "train.log_every=2"])
    config_text = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"finished at step 4 with another configuration \(optimizer.learning_"
                                          r"rate: .* -> 0.01\).* another run_dir, or .*checkpoint.resume=false"):
        jaxscale.train(other)
    assert (tmp_path / "run" / "config.yaml").read_text() == config_text  # nothing rewritten
