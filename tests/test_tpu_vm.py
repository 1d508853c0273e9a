"""`jaxscale tpu launch`: the gcloud commands for a v5e-256 slice and for 2 x v5e-256 (multislice), as
--dry-run prints them; every script sent to the workers parses as bash. No TPU or cloud account is reachable
here, so nothing is created."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from jaxscale.cli import main

INSTALL = "gs://my-bucket/wheels/jaxscale-0.1.0-py3-none-any.whl"


def dry_run(capsys, *extra: str) -> list[list[str]]:
    """The printed commands (comments dropped), each split as the shell would."""
    code = main(["tpu", "launch", "gpt2-124m", "--name", "run1", "--zone", "us-west4-a", "--type", "v5e-256",
                 "--run-dir", "gs://my-bucket/runs/gpt2", "--install", INSTALL, "--set", "train.steps=5000",
                 "--dry-run", *extra])
    assert code == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def remote(command: list[str]) -> str:
    return next(arg.removeprefix("--command=") for arg in command if arg.startswith("--command="))


def check_scripts_parse(commands):
    for command in commands:
        if any(arg.startswith("--command=") for arg in command):
            assert subprocess.run(["bash", "-n", "-c", remote(command)]).returncode == 0, remote(command)


def test_dry_run_for_one_v5e_256_slice(capsys):
    commands = dry_run(capsys, "--spot")
    create, state, install, start, follow = commands
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "run1"]
    assert {"--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=run1",
            "--spot", "--zone=us-west4-a"} <= set(create)
    assert state[3:6] == ["queued-resources", "describe", "run1"]
    assert install[3:7] == ["tpu-vm", "ssh", "run1", "--worker=all"]
    assert f"gcloud storage cp {INSTALL}" in remote(install)
    assert "gcsfuse" not in remote(install)  # the run directory is the bucket URL itself
    assert start[3:7] == ["tpu-vm", "ssh", "run1", "--worker=all"]
    assert ("~/jaxscale-venv/bin/jaxscale train gpt2-124m --distributed "
            "--set=run_dir=gs://my-bucket/runs/gpt2 --set=train.steps=5000") in remote(start)
    assert follow[3:7] == ["tpu-vm", "ssh", "run1", "--worker=0"]
    assert "exit $(cat ~/jaxscale-train.exit)" in remote(follow)
    check_scripts_parse(commands)


def test_dry_run_for_two_v5e_256_slices(capsys):
    commands = dry_run(capsys, "--slices", "2")
    create = commands[0]
    assert {"--node-count=2", "--node-prefix=run1"} <= set(create) and "--spot" not in create
    assert not any(arg.startswith("--node-id") for arg in create)
    per_node = [c[5] for c in commands[2:6]]  # install on run1-0, run1-1, then start on run1-0, run1-1
    assert per_node == ["run1-0", "run1-1", "run1-0", "run1-1"]
    assert all("--worker=all" in c for c in commands[2:6])
    assert commands[-1][5:7] == ["run1-0", "--worker=0"]
    check_scripts_parse(commands)


def test_a_local_experiment_file_is_copied_to_the_workers(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("train:\n  steps: 10\n")
    code = main(["tpu", "launch", "mine.yaml", "--name", "r", "--zone", "z", "--type", "v6e-8", "--run-dir",
                 "gs://my-bucket/r", "--install", "jaxscale[tpu] @ git+https://example.org/jaxscale.git",
                 "--dry-run"])
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert code == 0
    assert commands[2][3:] == ["tpu-vm", "scp", "mine.yaml", "r:", "--worker=all", "--zone=z"]
    assert "--runtime-version=v2-alpha-tpuv6e" in commands[0]
    assert "jaxscale train mine.yaml --distributed" in remote(commands[4])


@pytest.mark.parametrize("flag, value, message", [
    ("--run-dir", "runs/local", "give a bucket URL"),
    ("--type", "v9x-8", "expected a Cloud TPU type"),
])
def test_bad_launch_arguments_are_refused(capsys, flag, value, message):
    args = {"--run-dir": "gs://my-bucket/r", "--type": "v5e-256", flag: value}
    code = main(["tpu", "launch", "default", "--name", "r", "--zone", "z", "--install", INSTALL, "--dry-run",
                 *[x for kv in args.items() for x in kv]])
    assert code == 2 and message in capsys.readouterr().err


STAND_IN = '''#!{python}
"""Stands in for gcloud (no cloud account here): keeps the queued resource's state in a file, logs each
call, and ends worker 0's log stream with the next scripted exit code."""
import json, sys
from pathlib import Path
here = Path(__file__).parent
state = here / "state"
with (here / "calls").open("a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if "describe" in args:
    if not state.exists():
        sys.exit(1)
    print(state.read_text())
elif "create" in args:
    state.write_text("ACTIVE")
elif "delete" in args:
    state.unlink()
elif "--worker=0" in args:
    codes = json.loads((here / "codes").read_text())
    code, then = codes.pop(0)
    (here / "codes").write_text(json.dumps(codes))
    if then:
        state.write_text(then)
    sys.exit(code)
'''


@pytest.mark.parametrize("codes, result, creates, starts", [
    # a preemption notice on a live slice, then the slice taken back mid-stream (spot), then done
    ([[75, None], [255, "SUSPENDED"], [0, None]], 0, 2, 3),
    ([[2, None]], 2, 1, 1),  # a configuration problem: stop, no restart
])
def test_the_launch_loop_restarts_after_preemption(tmp_path, monkeypatch, codes, result, creates, starts):
    (tmp_path / "gcloud").write_text(STAND_IN.format(python=sys.executable))
    (tmp_path / "gcloud").chmod(0o755)
    (tmp_path / "codes").write_text(json.dumps(codes))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code = main(["tpu", "launch", "default", "--name", "r", "--zone", "z", "--type", "v5e-16", "--run-dir",
                 "gs://my-bucket/r", "--install", INSTALL])
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert code == result
    assert sum("create" in c for c in calls) == creates and sum("delete" in c for c in calls) == creates - 1
    assert sum(any("nohup" in a for a in c) for c in calls) == starts
