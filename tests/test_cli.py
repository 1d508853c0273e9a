"""`jaxscale train` end to end, as a user runs it: a real process, a real run directory."""
import json
import os
import subprocess
import sys

import pytest

import jaxscale

CLI = [sys.executable, "-m", "jaxscale.cli"]


def run_cli(args, tmp_path, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "JAXSCALE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_train_on_a_mixed_mesh_writes_metrics_and_the_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train", "--set", "mesh=cpu-8", "--set", "train.steps=30", "--set", "train.log_every=5",
                      "--set", "train.eval_every=15", "--set", f"run_dir={run_dir}", "--set", "model.seq_len=64",
                      "--set", "model.n_layers=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 5, 10, 15, 20, 25, 30]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    for key in ("lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "data_wait_s", "tokens", "elapsed_s",
                "energy_j", "j_per_token", "avg_power_w"):
        assert key in train_rows[-1]
    assert train_rows[-1]["tokens_per_s"] > 0 and train_rows[-1]["mfu"] is None  # no peak FLOP/s for a CPU
    assert train_rows[-1]["energy_j"] is None and train_rows[-1]["tokens"] == 30 * 16 * 64  # no NVML here
    assert [r["step"] for r in rows if "eval_loss" in r] == [15, 30]
    assert (run_dir / "config.yaml").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] == 30 * 16 * 64 and summary["wall_s"] > 0 and summary["energy_j"] is None
    assert "trained 30 steps: loss" in result.stdout


def test_bad_config_exits_with_the_message_and_no_traceback(tmp_path):
    result = run_cli(["train", "--set", "mesh.tensor=3"], tmp_path)
    assert result.returncode == 2
    assert "jaxscale: error: mesh.data=-1 cannot fill 8 devices" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_api_trains_and_returns_state_and_metrics(tmp_path):
    config = jaxscale.load_config(None, ["train.steps=4", "train.log_every=2", "train.eval_every=0",
                                         "model.seq_len=32", "model.n_layers=1", "train.progress=false",
                                         f"run_dir={tmp_path / 'api'}"])
    result = jaxscale.train(config)
    assert int(result.state.step) == 4
    assert [row["step"] for row in result.metrics] == [1, 2, 4]
    assert result.state.params["blocks"]["wqkv"].shape[0] == 1


@pytest.mark.parametrize("args,message", [
    (["--num-processes", "2", "--process-id", "0"],
     "--process-id takes effect only with --coordinator: add --coordinator HOST:PORT"),
    (["--process-id", "1"], "takes effect only with --coordinator"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout 0.0 must be > 0 seconds"),
    (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes N and --process-id I too"),
    (["--coordinator", "localhost:1234", "--num-processes", "2"], "--coordinator needs --process-id I too"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id from 0 to --num-processes - 1"),
])
def test_incomplete_multi_process_flags_are_refused(tmp_path, args, message):
    result = run_cli(["train", "--set", f"run_dir={tmp_path / 'run'}", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("jaxscale: error: ")]
    assert error and message in error[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("model.n_heads=0", "model.n_heads=0 must be >= 1"),
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("sharding.params.embd=fsdp", "did you mean sharding.params.embed?"),
    ("run_dir=s3://bucket/runs/a", "run_dir=s3://bucket/runs/a: jaxscale keeps run directories on local disk or "
                                   "in a gs:// bucket, not at s3:// URLs; give gs://BUCKET/PATH, or mount"),
    ("checkpoint.dir=gs:/bucket/ckpt", "checkpoint.dir=gs:/bucket/ckpt looks like a URL with a slash missing; write "
                                       "gs://bucket/ckpt"),
])
def test_bad_sizes_and_rule_names_exit_2_with_the_message(tmp_path, override, message):
    result = run_cli(["train", "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.progress=false",
                      "--set", override], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("jaxscale: error: ")]
    assert error and message in error[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "gs:").exists()  # nothing written


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_a_resumed_run_says_which_steps_it_trained(tmp_path):
    settings = ["--set", f"run_dir={tmp_path / 'run'}", "--set", "model.n_layers=1", "--set", "model.seq_len=32",
                "--set", "train.eval_every=0", "--set", "checkpoint.every_steps=2"]
    first = run_cli(["train", *settings, "--set", "train.steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 2 steps: loss" in first.stdout
    second = run_cli(["train", *settings, "--set", "train.steps=4"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed after step 2, trained to step 4: loss" in second.stdout
    curves = run_cli(["plot", str(tmp_path / "run")], tmp_path)
    assert curves.returncode == 0, curves.stderr[-3000:]
    assert "run: 4 steps, loss" in curves.stdout and "restarts 1" in curves.stdout
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
