"""TensorBoard event files and profiles written by a real training run, read back with TensorBoard's own reader."""
import glob
import logging
from pathlib import Path

import pytest

from jaxscale.config import load_config
from jaxscale.errors import ConfigError
from jaxscale.observe.trackers import TENSORBOARD_DIR
from jaxscale.training import train

TINY = ["model.preset=tiny", "model.seq_len=32", "model.n_layers=1", "model.d_model=32", "model.n_heads=4",
        "train.batch_size=8", "train.progress=false", "train.log_every=2", "train.eval_every=4",
        "train.eval_batches=1", "stragglers.every=0"]


def tiny_run(run_dir: Path, *extra: str):
    return train(load_config(None, [*TINY, f"run_dir={run_dir}", *extra]))


def test_tensorboard_event_files_hold_loss_eval_loss_config_and_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_run(tmp_path / "run", "train.steps=8", "tracking.writers=[jsonl,tensorboard]")
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval_loss")] == [4, 8]
    assert "config/text_summary" in tags["tensors"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "seq_len: 32" in config_text
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"train.batch_size" in plugins["_hparams_/session_start_info"]


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'jaxscale\[wandb\]'"):
        load_config(None, ["tracking.writers=[jsonl,wandb]"])


@pytest.mark.slow  # W&B starts a service process of its own
def test_wandb_offline_run_logs_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run(tmp_path / "run", "train.steps=4", "tracking.writers=[jsonl,wandb]")
    run_dirs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
    assert len(run_dirs) == 1
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    assert run_dirs[0].endswith(run_id)
    api_file = Path(run_dirs[0]) / f"run-{run_id}.wandb"
    assert api_file.stat().st_size > 0
    assert wandb.__version__


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """(run_dir, the log lines) of a run that traced steps 3 and 4."""
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    handler, log = Lines(), logging.getLogger("jaxscale")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        tiny_run(run_dir, "train.steps=6", "profile.steps=3:5")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return run_dir, handler.lines


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def profile_session(run_dir: Path) -> Path:
    sessions = list((run_dir / "profile" / "process_0" / "plugins" / "profile").iterdir())
    assert len(sessions) == 1
    return sessions[0]


def test_profile_steps_trace_in_tensorboards_layout_and_print_a_summary(profiled_run):
    run_dir, lines = profiled_run
    session = profile_session(run_dir)
    assert list(session.glob("*.xplane.pb")) and list(session.glob("*.trace.json.gz"))
    summary = next(line for line in lines if line.startswith("profile of steps 3:5"))
    assert "/host:CPU:" in summary and "compute " in summary and "communication " in summary and "idle " in summary
    assert " ms  x" in summary  # the top operations, with their calls per step


def test_the_profile_opens_in_tensorboards_profile_plugin(profiled_run):
    """XProf, TensorBoard's profile plugin, turns the trace into its trace viewer and overview page."""
    tool_data = pytest.importorskip("xprof.convert.raw_to_tool_data")
    paths = [str(p) for p in profile_session(profiled_run[0]).glob("*.xplane.pb")]
    assert "trace_viewer" in ",".join(tool_data.xspace_to_tool_names(paths))
    trace, content_type = tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    assert content_type == "application/json" and '"/host:CPU"' in trace
    overview, _ = tool_data.xspace_to_tool_data(paths, "overview_page", {})
    assert overview


def test_a_profile_window_past_the_last_step_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="profile.steps=8:12 reaches past train.steps=6"):
        tiny_run(tmp_path / "run", "train.steps=6", "profile.steps=8:12")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_session_resumed_inside_the_window_traces_the_rest_of_it(tmp_path):
    import jax
    import jax.numpy as jnp

    from jaxscale.observe.profile import ProfileConfig, StepProfiler

    profiler = StepProfiler(ProfileConfig(steps="2:5"), tmp_path, total_steps=10)
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    state = jnp.ones((64, 64))
    for step in (4, 5, 6):  # resumed from a checkpoint at step 3
        profiler.before(step)
        state = step_fn(state)
        profiler.after(step, state)
    assert not profiler.active and profiler.traced == 1 and profiler.summary
    assert list((tmp_path / "profile" / "process_0" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_run_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    """A notebook or test runner that swaps (and closes) sys.stderr after the first run still gets the lines."""
    import io
    import sys

    from jaxscale.training.loop import StderrHandler

    logger = logging.getLogger("jaxscale.stderr_test")
    logger.propagate = False
    logger.addHandler(StderrHandler())
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logger.warning("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logger.warning("two")
    assert second.getvalue() == "two\n"
