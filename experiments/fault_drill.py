"""Fault drills on real devices: a 4-process training run is stopped by a real signal, then continued.

    python experiments/fault_drill.py elastic OUT        # 4 GPUs: SIGKILL, then resume as 1 process on 2 GPUs
    python experiments/fault_drill.py preempt OUT        # 4 GPUs: SIGTERM, then resume as 1 process on 4 GPUs
    python experiments/fault_drill.py elastic OUT --cpu  # the same with a tiny model on CPU devices

Both start `jaxscale train` (gpt2-124m, or a tiny model with --cpu) as 4 processes of one device each, joined by
`jax.distributed` on localhost, with the mesh fsdp=4 and a checkpoint every 20 steps.

- elastic: every process is SIGKILLed once the run has logged step 55; the run is restarted as one process on 2
  devices with `train.elastic=true`. It resumes from the newest checkpoint that was finalized before the kill,
  refits the mesh to fsdp=2 with twice the microbatches (same global batch), and retrains the steps after it:
  their losses are compared with the killed run's.
- preempt: every process gets SIGTERM once the run has logged step 30, as a cluster scheduler sends it. All must
  stop at the same step, save there and exit 75; one process on the same 4 devices then resumes at that step.

Prints one JSON line; exits 1 if the drill did not go as described.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 4
STOP_AFTER = {"elastic": 55, "preempt": 30}
RESTART_DEVICES = {"elastic": 2, "preempt": 4}


def train_command(run_dir: Path, cpu: bool, extra: list[str]) -> list[str]:
    settings = [f"run_dir={run_dir}", "train.steps=200", "train.log_every=1", "checkpoint.every_steps=20",
                "train.elastic=true", "train.progress=false", "mesh={data: 1, fsdp: 4}"]
    experiment = "gpt2-124m"
    if cpu:
        experiment = "default"
        settings += ["model.preset=tiny", "model.seq_len=64", "train.batch_size=16", "train.eval_every=0"]
    return [sys.executable, "-m", "jaxscale.cli", "train", experiment,
            *[arg for s in settings for arg in ("--set", s)], *extra]


def environment(devices: list[int], cpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if cpu:
        env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={len(devices)}"}
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return env


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete_lines = path.read_text().split("\n")[:-1]  # the last one may be half written
    return [json.loads(line) for line in complete_lines if line.startswith("{")]


def last_trained_step(rows: list[dict]) -> int:
    return max((row["step"] for row in rows if "loss" in row), default=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def stopped_first_run(kind: str, run_dir: Path, out: Path, cpu: bool, timeout: float) -> tuple[int, list[int]]:
    """Starts the 4 processes, signals them all once the run has logged STOP_AFTER[kind] steps, waits for them:
    (the last step logged before the signal, the exit codes)."""
    port = free_port()
    started = time.time()
    processes = []
    try:
        for rank in range(PROCESSES):
            command = train_command(run_dir, cpu, ["--coordinator", f"localhost:{port}", "--num-processes",
                                                   str(PROCESSES), "--process-id", str(rank)])
            with (out / f"first-run-process{rank}.log").open("w") as log:
                processes.append(subprocess.Popen(command, env=environment([rank], cpu), stdout=log,
                                                  stderr=subprocess.STDOUT, cwd=out))
        while (last_trained_step(metric_rows(run_dir)) < STOP_AFTER[kind] and time.time() - started < timeout
               and all(p.poll() is None for p in processes)):
            time.sleep(0.02)
        signalled_after = last_trained_step(metric_rows(run_dir))
        for p in processes:
            p.send_signal(signal.SIGKILL if kind == "elastic" else signal.SIGTERM)
        return signalled_after, [p.wait(timeout=timeout) for p in processes]
    finally:  # nothing outlives the drill
        for p in processes:
            p.kill()


def drill(kind: str, out: Path, cpu: bool, timeout: float) -> dict:
    run_dir = out / "run"
    started = time.time()
    signalled_after, exit_codes = stopped_first_run(kind, run_dir, out, cpu, timeout)
    first_rows = metric_rows(run_dir)

    devices = list(range(RESTART_DEVICES[kind]))
    with (out / "restart.log").open("w") as log:
        restart = subprocess.run(train_command(run_dir, cpu, []), env=environment(devices, cpu), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=out, timeout=timeout)
    later_rows = metric_rows(run_dir)[len(first_rows):]
    resume = next((row for row in later_rows if row.get("event") == "resume"), {})
    saved_on_notice = [row["step"] for row in first_rows if row.get("event") == "preempted"]

    first_losses = {row["step"]: row["loss"] for row in first_rows if "loss" in row}
    later_losses = {row["step"]: row["loss"] for row in later_rows if "loss" in row}
    retrained = sorted(set(first_losses) & set(later_losses))
    differences = [abs(first_losses[s] - later_losses[s]) / abs(first_losses[s]) for s in retrained]
    final_step = last_trained_step(later_rows)
    report = {
        "drill": kind, "platform": "cpu" if cpu else "gpu", "first_run": f"{PROCESSES} processes x 1 device",
        "restart": f"1 process x {len(devices)} devices", "signal": "SIGKILL" if kind == "elastic" else "SIGTERM",
        "signalled_after_step": signalled_after, "exit_codes": exit_codes, "preempted_at_step": saved_on_notice,
        "resumed_from_step": resume.get("step"), "elastic": resume.get("elastic"),
        "restart_exit_code": restart.returncode, "final_step": final_step, "final_loss": later_losses.get(final_step),
        "retrained_steps": len(retrained), "max_relative_loss_difference": max(differences, default=None),
        "wall_s": time.time() - started,
    }
    report["ok"] = drill_went_as_described(report)
    return report


def drill_went_as_described(r: dict) -> bool:
    finished = r["restart_exit_code"] == 0 and r["final_step"] == 200 and r["resumed_from_step"] is not None
    if r["drill"] == "elastic":
        return finished and r["resumed_from_step"] <= r["signalled_after_step"] and r["elastic"] is not None
    stopped_together = r["exit_codes"] == [75] * PROCESSES and len(set(r["preempted_at_step"])) == 1
    return finished and stopped_together and r["resumed_from_step"] == r["preempted_at_step"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drill", choices=sorted(STOP_AFTER))
    parser.add_argument("out", type=Path, help="an empty directory for the run and the processes' logs")
    parser.add_argument("--cpu", action="store_true", help="a tiny model on CPU devices instead of 4 GPUs")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for each phase")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: the drill needs a fresh run directory (pick a new path)")
    args.out.mkdir(parents=True, exist_ok=True)
    report = drill(args.drill, args.out.resolve(), args.cpu, args.timeout)
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
