"""Training curves (`jaxscale plot`): read a real run's metrics.jsonl, draw it, refuse what is not a run."""
import shutil

import numpy as np
import pytest

import jaxscale
from jaxscale.errors import ConfigError
from jaxscale.training.curves import plot_runs, read_run, read_runs, smoothed, summary_line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("curves") / "a" / "run"
    config = jaxscale.load_config(None, ["train.steps=8", "train.log_every=1", "train.eval_every=4",
                                         "model.seq_len=32", "model.n_layers=1", "train.progress=false",
                                         f"run_dir={path}"])
    jaxscale.train(config)
    return path


def test_a_run_is_read_with_its_training_and_held_out_loss(run_dir):
    run = read_run(run_dir)
    assert list(run.steps) == list(range(1, 9)) and list(run.eval_steps) == [4, 8]
    assert run.tokens_per_step == 16 * 32  # the default batch of 16 sequences of 32 tokens
    assert np.isnan(run.tokens_per_s[0]) and (run.tokens_per_s[1:] > 0).all()  # row 1 includes compiling
    assert run.events == [] and run.skipped_updates == 0
    assert summary_line(run).startswith("run: 8 steps, loss ")


def test_runs_are_drawn_against_steps_or_tokens_and_named_apart(run_dir, tmp_path):
    other = tmp_path / "b" / "run"
    shutil.copytree(run_dir, other)
    assert [r.name for r in read_runs([run_dir, other])] == ["a/run", "b/run"]
    for x in ("step", "tokens"):
        path = plot_runs([run_dir, other], tmp_path / f"{x}.png", x=x)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_smoothed_loss_starts_at_the_first_value_and_follows_a_constant():
    values = np.array([4.0, 2.0, 2.0, 2.0])
    assert smoothed(values, 0.6)[0] == 4.0  # debiased: not pulled towards zero
    assert np.allclose(smoothed(np.full(5, 3.0), 0.9), 3.0)
    assert np.array_equal(smoothed(values, 0.0), values)
    with_skipped = smoothed(np.array([4.0, np.nan, np.inf, 2.0]), 0.5)  # a skipped update's loss is not finite
    assert np.isnan(with_skipped[1:3]).all() and with_skipped[3] == (0.25 * 4 + 0.5 * 2) / 0.75


def test_what_is_not_a_run_is_refused_with_what_to_give(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="no run directory"):
        read_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match="metrics.jsonl does not exist"):
        read_run(tmp_path)
    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    with pytest.raises(ConfigError, match="no training rows yet"):
        read_run(started)
    no_config = tmp_path / "no_config"
    shutil.copytree(run_dir, no_config)
    (no_config / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        read_run(no_config)
    with pytest.raises(ConfigError, match="smooth=1"):
        plot_runs([run_dir], tmp_path / "x.png", smooth=1)
