"""Sweeps (planning, one real run, resuming, parallel workers), scaling.json points, the `jaxscale scaling`
commands, and the code corpus the GPU sweep trains on."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import jaxscale
from jaxscale.cli import main
from jaxscale.errors import ConfigError
from jaxscale.scaling.fit import fit_loss_law
from jaxscale.scaling.law import LossLaw
from jaxscale.scaling.points import ScalingPoint, final_loss, find_points, read_point, write_point
from jaxscale.scaling.sweep import PRESETS, ModelShape, SweepStopped, plan_sweep, run_sweep, worker_devices

REPO = Path(__file__).resolve().parent.parent


def test_model_shapes_parse_and_reject_bad_sizes():
    shape = ModelShape.parse("64x2", head_dim=32)
    assert (shape.d_model, shape.n_layers, shape.n_heads, shape.name) == (64, 2, 2, "d64-l2")
    assert ModelShape.parse("16x1", head_dim=32).n_heads == 1  # narrower than one head: a single head
    for bad in ("64", "64x", "x2", "48x2"):  # 48 is not a multiple of the head size 32
        with pytest.raises(ValueError, match="model size"):
            ModelShape.parse(bad, head_dim=32)


def test_final_loss_prefers_the_last_eval_loss():
    rows = [{"step": 10, "loss": 3.0}, {"step": 10, "eval_loss": 3.1}, {"step": 20, "loss": 2.5},
            {"step": 20, "eval_loss": 2.6}]
    assert final_loss(rows) == (2.6, "eval")
    train_only = [{"step": s, "loss": float(s)} for s in range(1, 8)]
    assert final_loss(train_only) == (pytest.approx(5.0), "train")  # mean of the last five: 3..7
    with pytest.raises(ValueError, match="neither eval_loss nor loss"):
        final_loss([{"step": 1}])


def test_final_loss_of_a_diverged_run_is_refused_not_taken_from_earlier_steps():
    diverged = [{"step": 10, "loss": 3.0}, {"step": 10, "eval_loss": 3.1}, {"step": 20, "loss": float("nan")},
                {"step": 20, "eval_loss": float("nan")}]
    with pytest.raises(ValueError, match="final eval_loss is nan, not finite: the run diverged"):
        final_loss(diverged)
    train_only = [{"step": s, "loss": float(s)} for s in range(1, 8)] + [{"step": 8, "loss": float("nan")}]
    assert final_loss(train_only) == (pytest.approx(5.5), "train")  # a skipped update: the mean of 4..7
    with pytest.raises(ValueError, match="final training losses are .* not finite"):
        final_loss(train_only[:2] + [{"step": s, "loss": float("inf")} for s in range(3, 8)])


@pytest.mark.parametrize("tokens,message", [
    ("0", "token budget '0' in --tokens '0' must be a positive number"),
    ("nan", "token budget 'nan'"),
    ("inf", "token budget 'inf'"),
    ("1e5,,2e5", "token budget '' in --tokens '1e5,,2e5'"),
    ("", "token budget ''"),
    ("1e5,1e5", "plan one run twice: d32-l1-t100K (token budget 100000) and d32-l1-t100K"),
    ("1e5,1.001e5", "d32-l1-t100K (token budget 100000) and d32-l1-t100.1K (token budget 100100) are both d32-l1 "
                    "for 49 steps"),
    ("1000", "token budget 1000 rounds to 0 steps of 2048 tokens"),
])
def test_sweep_refuses_budgets_that_are_not_positive_or_plan_one_run_twice(tmp_path, capsys, tokens, message):
    out = tmp_path / "sweep"
    assert main(["scaling", "sweep", "--sizes", "32x1", f"--tokens={tokens}", "--out", str(out), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_sweep_refuses_a_size_given_twice(tmp_path, capsys):
    assert main(["scaling", "sweep", "--sizes", "32x1,32 x 1", "--tokens", "1e5", "--out", str(tmp_path),
                 "--dry-run"]) == 2
    assert "plan one run twice" in capsys.readouterr().err  # two workers would train in one directory


def test_sweep_names_a_damaged_scaling_json_and_a_diverged_run(tmp_path, monkeypatch, capsys):
    (run,) = plan_sweep("default", PRESETS["cpu"], [ModelShape.parse("32x1", 32)], [20 * 2048], tmp_path, [])
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "scaling.json").write_text('{"N": 1')  # cut short
    with pytest.raises(ConfigError, match="scaling.json is not a scaling point .* delete that file and rerun"):
        run_sweep([run])
    (run.run_dir / "scaling.json").unlink()
    (run.run_dir / "metrics.jsonl").write_text('{"step": 20, "loss": NaN}\n{"step": 20, "eval_loss": NaN}\n')
    finished = SimpleNamespace(preempted=False, state=SimpleNamespace(step=20), metrics=[])
    monkeypatch.setattr(jaxscale, "train", lambda config: finished)  # as train returns for a finished run
    with pytest.raises(ConfigError, match="no scaling point: its final eval_loss is nan.*lower optimizer"):
        run_sweep([run])
    assert not (run.run_dir / "scaling.json").exists()


def test_plan_uses_the_experiment_and_gives_each_run_its_own_schedule(tmp_path):
    runs = plan_sweep("default", PRESETS["cpu"], [ModelShape.parse("32x1", 32), ModelShape.parse("64x2", 32)],
                      [1e5, 4e5], tmp_path, ["optimizer.learning_rate=1e-3"])
    assert [r.run_dir.name for r in runs] == ["d32-l1-t100K", "d32-l1-t400K", "d64-l2-t100K", "d64-l2-t400K"]
    tokens_per_step = 16 * 128  # the cpu preset: batch 16 x 128 tokens
    for run in runs:
        c = run.config
        assert (c.model.d_model, c.model.n_layers) == (run.shape.d_model, run.shape.n_layers)
        assert run.steps == round(run.tokens / tokens_per_step)
        assert c.train.steps == run.steps and c.train.eval_every == run.steps  # one evaluation, at the end
        assert run.d == run.steps * tokens_per_step
        assert run.n == c.model.matmul_params()
        assert c.optimizer.learning_rate == 1e-3  # the user's --set reaches every run
        assert c.resolved_run_dir() == run.run_dir
    assert not any(r.run_dir.exists() for r in runs)  # planning trains nothing


@pytest.mark.slow
def test_sweep_trains_records_and_resumes(tmp_path):
    (run,) = plan_sweep("default", PRESETS["cpu"], [ModelShape.parse("32x1", 32)], [20 * 2048], tmp_path, [])
    (point,) = run_sweep([run])
    saved = json.loads((run.run_dir / "scaling.json").read_text())
    assert saved["N"] == point.N == run.config.model.matmul_params()
    assert saved["D"] == point.D == 20 * 2048
    assert saved["loss_kind"] == "eval" and 0 < saved["loss"] < np.log(257) + 0.5  # better than chance-ish
    metrics_lines = (run.run_dir / "metrics.jsonl").read_text().count("\n")
    (again,) = run_sweep([run])  # finished runs are skipped, not retrained
    assert again == point
    assert (run.run_dir / "metrics.jsonl").read_text().count("\n") == metrics_lines
    # killed after its last checkpoint, before scaling.json: the rerun trains nothing and records the same point
    (run.run_dir / "scaling.json").unlink()
    (recovered,) = run_sweep([run])
    assert recovered == point and (run.run_dir / "scaling.json").is_file()


def test_a_run_stopped_by_a_signal_is_not_recorded(tmp_path, monkeypatch):
    (run,) = plan_sweep("default", PRESETS["cpu"], [ModelShape.parse("32x1", 32)], [20 * 2048], tmp_path, [])
    stopped = SimpleNamespace(preempted=True, state=SimpleNamespace(step=7), metrics=[{"step": 5, "loss": 3.0}])
    monkeypatch.setattr(jaxscale, "train", lambda config: stopped)  # as train returns after SIGTERM at step 7
    with pytest.raises(SweepStopped, match="stopped at step 7 of 20"):
        run_sweep([run])
    assert not (run.run_dir / "scaling.json").exists()  # a rerun continues it instead of skipping it


def test_sweep_dry_run_prints_the_plan(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["scaling", "sweep", "default", "--sizes", "32x1,64x2", "--tokens", "1e5,2e5", "--out", str(out),
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("4 runs in")
    assert "d64-l2-t200K" in text and "steps=    98" in text
    assert not out.exists()


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_parallel_sweep_matches_the_sequential_one_and_names_a_failed_run(tmp_path, capsys):
    # Child processes inherit conftest's 8 CPU devices, as this process has them: the same mesh, the same losses.
    steps = [5, 10]
    sequential = run_sweep(plan_sweep("default", PRESETS["cpu"], [ModelShape.parse("32x1", 32)],
                                      [s * 2048 for s in steps], tmp_path / "sequential", []))
    out = tmp_path / "parallel"
    broken = out / "d32-l1-t30.72K"  # a third run that fails in its child: config.yaml cannot be written
    (broken / "config.yaml").mkdir(parents=True)
    code = main(["scaling", "sweep", "default", "--sizes", "32x1", "--tokens", "10240,20480,30720", "--out",
                 str(out), "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"1 of 3 runs failed: d32-l1-t30.72K (exit code 1; log: {broken / 'sweep.log'})" in err
    assert "IsADirectoryError" in (broken / "sweep.log").read_text()  # the child's output is in its log
    assert not (broken / "scaling.json").exists()
    for expected in sequential:  # the runs that succeeded are recorded, with the sequential sweep's losses
        run_dir = out / Path(expected.run_dir).name
        point = read_point(run_dir / "scaling.json")
        assert (point.N, point.D) == (expected.N, expected.D)
        assert point.loss == pytest.approx(expected.loss, abs=1e-6)
        assert "scaling sweep default --preset=cpu --sizes=32x1" in (run_dir / "sweep.log").read_text()


def test_sweep_workers_must_be_positive_and_fit_the_visible_gpus(monkeypatch, capsys):
    assert main(["scaling", "sweep", "--workers", "0", "--dry-run"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_devices(3) == ["0", "1", "2"]  # worker slot i: GPU i
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # a scheduler gave this job GPUs 4, 6 and 7
    assert worker_devices(2) == ["4", "6"]
    with pytest.raises(ValueError, match="lists 3 GPUs; use at most 3 workers"):
        worker_devices(4)


def load_code_corpus():
    spec = importlib.util.spec_from_file_location("code_corpus", REPO / "experiments" / "code_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_corpus_writes_each_good_file_once(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "a.py").write_text("print('a')\n")
    (src / "pkg" / "b.py").write_text("x = 'é'\n")
    (src / "pkg" / "copy_of_a.py").write_text("print('a')\n")  # same content as a.py: written once
    (src / "empty.py").write_text("  \n")
    (src / "latin1.py").write_bytes("y = 'é'\n".encode("latin-1"))  # not UTF-8
    (src / "notes.txt").write_text("not python\n")
    (src / "pkg" / "__pycache__" / "c.py").write_text("z = 1\n")
    out = tmp_path / "corpus.jsonl"
    assert load_code_corpus().main([str(out), str(src), "--no-python-paths"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == [{"text": "print('a')\n"}, {"text": "x = 'é'\n"}]  # sorted by path: a.py, pkg/b.py
    assert "2 files (5 found" in capsys.readouterr().out
    capped = tmp_path / "capped.jsonl"
    assert load_code_corpus().main([str(capped), str(src), "--no-python-paths", "--max-bytes", "15"]) == 0
    assert capped.read_text().count("\n") == 1  # the second file would pass 15 bytes of text


def write_synthetic_sweep(root, law: LossLaw) -> list[ScalingPoint]:
    points = []
    rng = np.random.default_rng(0)
    for n in np.logspace(4.5, 6, 5):
        for d in np.logspace(5, 6.5, 5):
            loss = float(law.loss(n, d) * np.exp(rng.normal(0, 0.002)))
            run_dir = root / f"n{n:.0f}-d{d:.0f}"
            points.append(ScalingPoint(N=n, D=d, loss=loss, loss_kind="eval", total_params=int(n),
                                       flops_per_token=6 * n, run_dir=str(run_dir)))
            write_point(points[-1])
    return points


def test_fit_command_reports_constants_allocation_holdout_and_draws_the_figure(tmp_path, capsys):
    law = LossLaw(E=1.5, A=40.0, B=300.0, alpha=0.35, beta=0.4)  # tiny-model-like losses, 2-3.5 nats
    points = write_synthetic_sweep(tmp_path / "sweep", law)
    assert len(find_points([str(tmp_path / "sweep")])) == 25  # a sweep's parent directory finds its runs
    png = tmp_path / "fit.png"
    code = main(["scaling", "fit", str(tmp_path / "sweep"), "--holdout", "--bootstrap", "6", "--budget", "1e14",
                 "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    fit = fit_loss_law([p.N for p in points], [p.D for p in points], [p.loss for p in points]).law
    n_opt, d_opt = fit.compute_optimal(1e14)
    assert f"N = {n_opt:.4g}, D = {d_opt:.4g}" in out
    assert f"alpha                  {fit.alpha:10.4g}" in out
    assert "95% interval" in out and "over 6 resamples" in out
    assert "holdout: fitted without the largest-compute run" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_fit_command_errors_on_missing_runs(tmp_path, capsys):
    assert main(["scaling", "fit", str(tmp_path / "nothing-here")]) == 2
    assert "has no scaling.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--bootstrap=-1"], "--bootstrap -1: give the number of resamples, >= 0"),
    (["--budget", "0"], "--budget 0.0: give a compute budget in FLOPs, a positive number"),
    (["--budget", "nan"], "--budget nan: give a compute budget in FLOPs"),
    (["--png", "fit.txt"], "--png fit.txt: a figure cannot be written as .txt"),
    (["--png", "."], "--png . is a directory; give a file name such as scaling_fit.png"),
])
def test_fit_command_refuses_bad_options_before_fitting(tmp_path, monkeypatch, capsys, flags, message):
    write_synthetic_sweep(tmp_path / "sweep", LossLaw(E=1.5, A=40.0, B=300.0, alpha=0.35, beta=0.4))
    monkeypatch.chdir(tmp_path)
    assert main(["scaling", "fit", str(tmp_path / "sweep"), "--bootstrap", "0", *flags]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""  # nothing fitted or printed first


def test_fit_command_counts_each_run_once_and_names_unfinished_ones(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    points = write_synthetic_sweep(sweep, LossLaw(E=1.5, A=40.0, B=300.0, alpha=0.35, beta=0.4))
    assert main(["scaling", "fit", str(sweep), points[0].run_dir, "--bootstrap", "0"]) == 2
    assert "scaling.json given more than once" in capsys.readouterr().err
    unfinished = sweep / "d999-l9-t1M"  # a run still training: config.yaml written, scaling.json not yet
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: d999-l9-t1M\n")
    assert main(["scaling", "fit", str(sweep), "--bootstrap", "0", "--png", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    assert "fitted on 25 runs" in out and f"note: left out 1 run(s) with no scaling.json yet: {unfinished}" in out
    assert f"figure: {tmp_path / 'fit.png'}" in out and (tmp_path / "fit.png").is_file()
