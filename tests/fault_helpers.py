"""Helpers for the fault-tolerance tests: real `jaxscale train` processes, and reading back what they
saved."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxscale.checkpointing import CheckpointStore, Restored
from jaxscale.checkpointing.fingerprint import summarize
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.training import build_trainer

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "jaxscale.cli", "train"]

# A model small enough that a step takes milliseconds on a CPU.
TINY = ["model.seq_len=32", "model.n_layers=1", "model.d_model=32", "model.n_heads=4", "train.batch_size=16",
        "train.eval_every=0", "train.progress=false", "train.log_every=1", "optimizer.warmup_steps=5"]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"run_dir={run_dir}", *extra]


def cli_args(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def environment(tmp_path: Path, devices: int) -> dict[str, str]:
    """Simulated CPU devices; the data and the compiled programs cached for the whole test session (the
    pytest base directory), so each process after the first one skips tokenizing and most compiling."""
    session = tmp_path.parent
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "JAXSCALE_CACHE": str(session / "fault-data-cache"),
            "JAX_COMPILATION_CACHE_DIR": str(session / "fault-compile-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_train(settings: list[str], tmp_path: Path, devices: int = 8, extra_args: tuple[str, ...] = (),
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + cli_args(settings) + list(extra_args), capture_output=True, text=True,
                          env=environment(tmp_path, devices), cwd=tmp_path, timeout=timeout)


def start_train(settings: list[str], tmp_path: Path, devices: int = 8, extra_args: tuple[str, ...] = (),
                log_name: str = "train.log") -> tuple[subprocess.Popen, Path]:
    """A training process in the background; its stdout and stderr go to a file (a pipe could fill up)."""
    log_path = tmp_path / log_name
    with log_path.open("w") as log_file:
        process = subprocess.Popen(CLI + cli_args(settings) + list(extra_args), stdout=log_file,
                                   stderr=subprocess.STDOUT, text=True, env=environment(tmp_path, devices),
                                   cwd=tmp_path)
    return process, log_path


def run_two_processes(command: list[str], tmp_path: Path, devices: int, timeout: float = 300) -> list[str]:
    """`command` as both processes of a 2-process job on localhost (`devices` CPU devices each); asserts both
    succeed and returns their stdouts."""
    port = free_port()
    processes = [subprocess.Popen(
        command + ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(tmp_path, devices),
        cwd=tmp_path) for i in range(2)]
    try:
        finished = [process.communicate(timeout=timeout) for process in processes]
    finally:  # a hung process must not outlive the test
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, finished):
        assert process.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in finished]


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n"
                                 + log_path.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}:\n" + log_path.read_text()[-3000:])
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    """The highest training step in metrics.jsonl so far (0 if none)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [row["step"] for row in map(json.loads, path.read_text().splitlines()[:-1]) if "loss" in row]
    return max(steps, default=0)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Finalized checkpoints (Orbax renames a checkpoint's directory into place when it is complete)."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def open_checkpoints(run_dir: Path):
    """(the run's checkpoint store, a trainer on one device of this process to restore into)."""
    config = load_config(None, overrides(run_dir, "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"))
    store = CheckpointStore(run_dir / "checkpoints", CheckpointConfig())
    return store, build_trainer(config, jax.devices()[:1])


def restore_newest(run_dir: Path) -> Restored:
    """The newest good checkpoint of a run, restored onto one device and verified against its fingerprints."""
    store, trainer = open_checkpoints(run_dir)
    try:
        restored = store.restore_newest(trainer.abstract_state())
    finally:
        store.close()
    assert restored is not None, f"no checkpoint in {run_dir}"
    return restored


def checkpoint_is_finite(run_dir: Path, step: int) -> bool:
    store, trainer = open_checkpoints(run_dir)
    try:
        return summarize(store.restore(step, trainer.abstract_state()).state)[1]
    finally:
        store.close()


def host_arrays(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
