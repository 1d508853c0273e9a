"""`jaxscale bench` on the CPU, and the MFU arithmetic against a hand count."""
import json
import os
import subprocess
import sys

import pytest
from fault_helpers import run_two_processes

from jaxscale.cost.catalog import peak_flops_for_device_kind
from jaxscale.errors import ConfigError
from jaxscale.model import ModelConfig

TINY = ["--set", "model.n_layers=1", "--set", "model.seq_len=32"]


def test_gpt2_124m_flops_per_token_by_hand():
    cfg = ModelConfig.from_preset("gpt2-124m")
    d, layers, seq, vocab = 768, 12, 1024, 50304  # vocab padded from 50257 to a multiple of 128
    per_layer = 4 * d * d + 2 * d * (4 * d)  # q, k, v, o and the two MLP matrices
    n = layers * per_layer + vocab * d  # the tied embedding is the output head's matmul
    assert cfg.matmul_params() == n == 123_568_128
    assert cfg.flops_per_token() == 6 * n + 12 * layers * d * seq == 854_654_976
    # 415,846 tokens/s on one H100 (BENCHMARKS.md) is 35.9% of its 989 TFLOP/s dense bf16 peak.
    peak = peak_flops_for_device_kind("NVIDIA H100 80GB HBM3")
    assert peak == 989e12
    assert 415_846 * cfg.flops_per_token() / peak == pytest.approx(0.3594, abs=1e-4)


def test_bench_runs_on_cpu_and_writes_json_and_a_trace(tmp_path):
    out, trace = tmp_path / "bench.json", tmp_path / "trace"
    out.write_text("an earlier result\n")  # replaced: --force
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAXSCALE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", "bench", *TINY, "--set", "mesh.data=2", "--warmup", "1",
         "--warmup-s", "0.5", "--windows", "2", "--steps-per-window", "2", "--out", str(out), "--force",
         "--profile", str(trace), "--profile-steps", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row == json.loads(result.stdout.strip().splitlines()[-1])
    assert row["devices"] == 2 and row["mesh"]["data"] == 2 and len(row["step_s_windows"]) == 2
    assert row["n_layers"] == 1 and row["d_model"] == 128  # the model measured, not only the experiment's name
    assert row["tokens_per_s"] == pytest.approx(16 * 32 / row["step_s"])
    assert row["mfu"] is None and row["peak_memory_gb"] is None  # a CPU has neither
    assert row["document_masking"] is True and row["attention_kernel"] == "xla"  # the default, on a CPU
    assert row["compile_s"] > 0 and row["final_loss"] > 0
    assert row["warmup_s"] >= 0.5 and row["warmup_steps"] > 1  # warmed up for the time asked, cycling its batch
    # the trace TensorBoard opens, and the one Perfetto opens; on a CPU the XLA ops of its host threads are summarized
    assert list(trace.glob("plugins/profile/*/*.xplane.pb")) and list(trace.glob("**/perfetto_trace.json.gz"))
    assert [d["device"] for d in row["profile"]] == ["/host:CPU"] and row["profile_steps"] == 2
    assert "/host:CPU: " in result.stderr and "ms per step" in result.stderr
    assert f"timed step (median window): {row['step_s'] * 1e3:.2f} ms" in result.stderr


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_two_processes_end_the_timed_warm_up_at_the_same_step(tmp_path):
    """Every step holds collectives, so the processes must agree when the warm-up's time is up (they warm up
    while any one's time is not); one step more on either would leave the other waiting at the end."""
    out = tmp_path / "bench.json"
    stdouts = run_two_processes(
        [sys.executable, "-m", "jaxscale.cli", "bench", *TINY, "--set", "mesh.data=8", "--warmup", "2",
         "--warmup-s", "1", "--windows", "1", "--steps-per-window", "2", "--out", str(out),
         "--profile", str(tmp_path / "trace")], tmp_path, devices=4)
    rows = [json.loads(stdout.strip().splitlines()[-1]) for stdout in stdouts]
    assert [row["process_index"] for row in rows] == [0, 1] and rows[0]["devices"] == 8
    assert rows[0]["warmup_steps"] == rows[1]["warmup_steps"] > 2  # rounds of 2 steps for at least 1 s
    assert json.loads(out.read_text()) == rows[0]  # process 0 writes the file
    for i in range(2):  # each process traces its own devices into its own folder
        assert list((tmp_path / "trace" / f"process_{i}").glob("**/perfetto_trace.json.gz"))


def test_profile_of_no_steps_is_refused_before_anything_runs(tmp_path):
    from jaxscale.bench import run_bench
    from jaxscale.config import load_config

    with pytest.raises(ConfigError, match="--profile-steps 1 or more"):
        run_bench(load_config(None, []), profile_dir=str(tmp_path), profile_steps=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["--windows", "0"], "windows=0: time at least one window (--windows 1 or more)"),
    (["--steps-per-window", "0"], "steps_per_window=0: time at least one step per window"),
    (["--warmup", "-1"], "warmup=-1: warm-up steps cannot be negative (--warmup 0 or more)"),
    (["--profile", "trace", "--profile-steps", "0"], "profile_steps=0: trace at least one step"),
    (["--warmup-s", "-1"], "warmup_s=-1.0: the warm-up time must be a finite number of seconds, 0 or more"),
    (["--warmup-s", "nan"], "warmup_s=nan: the warm-up time must be"),
    (["--out", "."], "--out '.' is a folder; give a file such as bench.json"),
])
def test_counts_that_leave_nothing_to_time_exit_2_before_anything_runs(tmp_path, args, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSCALE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "jaxscale.cli", "bench", *TINY, *args],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"jaxscale: error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no data cache, no trace


def test_an_existing_out_file_is_kept_without_force_and_a_trace_path_that_is_a_file_refused(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSCALE_CACHE": str(tmp_path / "cache")}
    (tmp_path / "taken.json").write_text("earlier result\n")
    for args, message in [(["--out", "taken.json"], "--out taken.json exists; add --force to replace it"),
                          (["--profile", "taken.json"], "--profile taken.json is a file; give a folder"),
                          (["--out", "taken.json/bench.json"],
                           f"--out taken.json/bench.json: {tmp_path / 'taken.json'} is a file, so nothing can be "
                           f"created inside it")]:
        result = subprocess.run([sys.executable, "-m", "jaxscale.cli", "bench", *TINY, *args],
                                capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert result.returncode == 2 and f"jaxscale: error: {message}" in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "taken.json").read_text() == "earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]  # no data cache: nothing ran
