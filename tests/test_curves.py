"""Training curves (`jaxscale plot`): read a real run's metrics.jsonl, draw it, refuse what is not a run."""
import shutil

import numpy as np
import pytest

import jaxscale
from jaxscale.cli import main
from jaxscale.errors import ConfigError
from jaxscale.training.curves import curves_figure, plot_runs, read_run, read_runs, smoothed, summary_line
from jaxscale.training.metrics import MetricsLogger


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


def test_a_row_cut_short_by_a_kill_is_skipped_and_the_restart_continues_on_a_line_of_its_own(run_dir, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(run_dir, killed)
    text = (killed / "metrics.jsonl").read_text()
    (killed / "metrics.jsonl").write_text(text[:-30])  # the last row (the final checkpoint event) half written
    assert list(read_run(killed).steps) == list(range(1, 9))
    logger = MetricsLogger(killed, total_steps=8, start_step=8, log_every=1, tokens_per_step=1, flops_per_token=1.0,
                           n_devices=1, show_progress=False, is_main_process=True)
    logger.write({"step": 8, "event": "resume"})  # what the restarted run writes first
    logger.close()
    assert (killed / "metrics.jsonl").read_text().endswith('\n{"step": 8, "event": "resume"}\n')
    run = read_run(killed)
    assert list(run.steps) == list(range(1, 9)) and run.events == [(8, "resume")]
    (killed / "metrics.jsonl").write_text(text.replace('"eval_loss"', 'eval_loss', 1))  # damaged mid-file
    with pytest.raises(ConfigError, match=r"metrics.jsonl:\d+ is not JSON"):
        read_run(killed)


@pytest.mark.parametrize("damaged_file,text,message", [
    ("config.yaml", "train: [\n", "config.yaml is not valid YAML"),
    ("config.yaml", "foo: 1\n", "config.yaml is not the config.yaml of a jaxscale train run"),
    ("config.yaml", "train: {batch_size: x}\nmodel: {seq_len: 32}\n", "must be positive whole numbers, got 'x' and 32"),
    ("metrics.jsonl", '{"loss": 3.0}\n', 'metrics.jsonl:1 has no whole-number "step"'),
    ("metrics.jsonl", '{"step": 1, "loss": "abc"}\n', "step 1 has loss 'abc', not a number"),
    ("metrics.jsonl", '{"step": 1, "loss": 3.0, "tokens_per_s": "fast"}\n', "step 1 has tokens_per_s 'fast', not a number"),
])
def test_a_damaged_config_or_rows_jaxscale_did_not_write_are_named(run_dir, tmp_path, damaged_file, text, message):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / damaged_file).write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_run(damaged)


def test_one_row_is_drawn_as_a_point_and_a_diverged_evaluation_is_not_the_best(run_dir, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(run_dir, short)
    lines = (short / "metrics.jsonl").read_text().splitlines()
    (short / "metrics.jsonl").write_text(lines[1] + "\n" + '{"step": 1, "eval_loss": NaN}\n')
    run = read_run(short)
    train_line = curves_figure([run]).axes[0].get_lines()[1]
    assert train_line.get_marker() == "o"  # a line through one point would draw nothing
    assert summary_line(run).endswith("held out nan")  # not "(best nan)"


def test_plot_command_refuses_a_figure_path_it_cannot_write_and_a_run_given_twice(run_dir, tmp_path, capsys):
    before = (run_dir / "config.yaml").read_bytes()
    for out, message in [(run_dir / "config.yaml", "a figure cannot be written as .yaml"),
                         (run_dir, "is a directory; give a file name such as")]:
        assert main(["plot", str(run_dir), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "noext")]) == 0
    assert f"wrote {tmp_path / 'noext.png'}" in capsys.readouterr().out  # where matplotlib puts it
    assert (tmp_path / "noext.png").stat().st_size > 10_000
    assert main(["plot", str(run_dir), str(run_dir / "."), "--out", str(tmp_path / "x.png")]) == 2
    assert "given more than once" in capsys.readouterr().err
