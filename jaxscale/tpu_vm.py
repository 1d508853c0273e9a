"""`jaxscale tpu launch`: train on Cloud TPU VMs from a workstation, through `gcloud`, until the run is done.

One queued resource holds the slice (or `--slices N` slices joined by the data-center network; the queued
resource's multislice runtime gives every worker the MEGASCALE_* settings JAX's multislice runtime reads).
Every worker gets jaxscale (with its `tpu` extra, which brings gcsfs) and runs `jaxscale train EXPERIMENT
--distributed` with the run directory in the bucket, given as its gs:// URL (checkpoints, metrics and config
outlive the slice; no mount); worker 0's log streams here. Exit code 75 (a preemption notice: the checkpoint is saved) or a slice taken back (spot) starts
the run again, on a new slice when needed, and it continues from the newest checkpoint in the bucket.
`--dry-run` prints every command instead of running it.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jaxscale.distributed import RESTART_CODES
from jaxscale.errors import ConfigError

# generation -> (accelerator type prefix, runtime version), from Cloud TPU's "TPU software versions" page
GENERATIONS = {"v5e": ("v5litepod", "v2-alpha-tpuv5-lite"), "v5p": ("v5p", "v2-alpha-tpuv5"),
               "v6e": ("v6e", "v2-alpha-tpuv6e"), "v4": ("v4", "tpu-ubuntu2204-base")}
EXIT_PREEMPTED = 75  # jaxscale train's exit code after a preemption notice (training/preemption.py)
SSH_LOST = 255  # ssh's own exit code: the connection, or the worker, went away
LOG = "~/jaxscale-train.log"
EXIT_FILE = "~/jaxscale-train.exit"
VENV = "~/jaxscale-venv"
POLL_S = 30


@dataclass(frozen=True)
class Launch:
    experiment: str
    name: str  # the queued resource; its slices are NAME (one) or NAME-0 .. NAME-{N-1}
    zone: str
    accelerator: str  # e.g. v5litepod-256
    runtime: str
    run_dir: str  # gs://bucket/path: checkpoints, metrics and config survive the slice
    install: str  # a pip requirement, or the gs:// URL of a jaxscale wheel
    slices: int = 1
    spot: bool = False
    project: str | None = None
    overrides: tuple[str, ...] = field(default=())

    @property
    def nodes(self) -> list[str]:
        return [self.name] if self.slices == 1 else [f"{self.name}-{i}" for i in range(self.slices)]


def parse_type(tpu_type: str) -> tuple[str, str]:
    """v5e-256 / v5litepod-256 / v5p-1024 / v6e-256 / v4-32 -> (accelerator type, runtime version)."""
    generation, _, count = tpu_type.rpartition("-")
    generation = "v5e" if generation == "v5litepod" else generation
    if generation not in GENERATIONS or not count.isdigit():
        raise ConfigError(f"--type {tpu_type}: expected a Cloud TPU type such as v5e-256, v5p-1024, v6e-256 or "
                          f"v4-32 (generations: {', '.join(GENERATIONS)})")
    prefix, runtime = GENERATIONS[generation]
    return f"{prefix}-{count}", runtime


def gcloud(zone: str, project: str | None, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={zone}", *([f"--project={project}"] if project else [])]


def create_command(launch: Launch) -> list[str]:
    nodes = ([f"--node-id={launch.name}"] if launch.slices == 1 else
             [f"--node-count={launch.slices}", f"--node-prefix={launch.name}"])
    return gcloud(launch.zone, launch.project, "queued-resources", "create", launch.name, f"--accelerator-type={launch.accelerator}",
                  f"--runtime-version={launch.runtime}", *nodes, *(["--spot"] if launch.spot else []))


def state_command(launch: Launch) -> list[str]:
    return gcloud(launch.zone, launch.project, "queued-resources", "describe", launch.name,
                  "--format=value(state.state)")


def delete_command(name: str, zone: str, project: str | None) -> list[str]:
    return gcloud(zone, project, "queued-resources", "delete", name, "--force", "--quiet")  # its slices too


def ssh_command(launch: Launch, node: str, worker: str, script: str) -> list[str]:
    return gcloud(launch.zone, launch.project, "tpu-vm", "ssh", node, f"--worker={worker}", f"--command={script}")


def remote_experiment(launch: Launch) -> str:
    """The experiment as the workers name it: a preset name, or the file copied into their home directory
    (where the commands run)."""
    return Path(launch.experiment).name if Path(launch.experiment).is_file() else launch.experiment


def install_script(launch: Launch) -> str:
    """jaxscale into a virtual environment (TPU VM images bring Python 3.10; jaxscale needs 3.11+, which uv
    installs), idempotently."""
    requirement = launch.install
    fetch = ""
    if requirement.startswith("gs://"):  # a wheel built here and copied to the bucket
        wheel = f"/tmp/{requirement.rsplit('/', 1)[-1]}"
        fetch = f"gcloud storage cp {shlex.quote(requirement)} {wheel} && "
        requirement = f"jaxscale[tpu] @ file://{wheel}"
    return (f"{fetch}python3 -m pip install --user --quiet uv && python3 -m uv venv --quiet --allow-existing "
            f"--python 3.11 {VENV} && python3 -m uv pip install --quiet --python {VENV}/bin/python "
            f"{shlex.quote(requirement)}")


def train_command(launch: Launch) -> str:
    overrides = [f"--set={o}" for o in (f"run_dir={launch.run_dir}", *launch.overrides)]
    return f"{VENV}/bin/jaxscale " + shlex.join(["train", remote_experiment(launch), "--distributed", *overrides])


def start_script(launch: Launch) -> str:
    """Every worker trains in the background (ssh returns at once), its log and exit code in its home."""
    return (f"rm -f {EXIT_FILE}; nohup bash -c {shlex.quote(f'{train_command(launch)} > {LOG} 2>&1; echo $? > {EXIT_FILE}')}"
            f" > /dev/null 2>&1 &")


def follow_script() -> str:
    """Worker 0's log until its run ends; the ssh session then exits with the run's exit code."""
    return (f"tail -n +1 -F {LOG} 2> /dev/null & tailer=$!; while [ ! -f {EXIT_FILE} ]; do sleep 5; done; "
            f"sleep 2; kill $tailer; exit $(cat {EXIT_FILE})")


def setup_commands(launch: Launch) -> list[tuple[str, list[str]]]:
    """(what, command): the experiment file (if one) and jaxscale onto every worker of every slice."""
    steps = []
    if Path(launch.experiment).is_file():
        steps += [(f"copy {launch.experiment} to every worker of {node}",
                   gcloud(launch.zone, launch.project, "tpu-vm", "scp", launch.experiment, f"{node}:",
                          "--worker=all")) for node in launch.nodes]
    return steps + [(f"install jaxscale on every worker of {node}",
                     ssh_command(launch, node, "all", install_script(launch))) for node in launch.nodes]


def start_commands(launch: Launch) -> list[tuple[str, list[str]]]:
    return [(f"start training on every worker of {node}", ssh_command(launch, node, "all", start_script(launch)))
            for node in launch.nodes]


def follow_command(launch: Launch) -> list[str]:
    return ssh_command(launch, launch.nodes[0], "0", follow_script())


def plan_commands(launch: Launch) -> list[tuple[str, list[str]]]:
    """(what, command) for one pass, as `--dry-run` prints it; `launch_run` loops around it."""
    return [("request the TPU slice" + ("s" if launch.slices > 1 else "") + (" (spot)" if launch.spot else ""),
             create_command(launch)),
            (f"wait until the queued resource is ACTIVE (asked every {POLL_S} s)", state_command(launch)),
            *setup_commands(launch), *start_commands(launch),
            ("stream worker 0's log; its exit code decides what happens next", follow_command(launch))]


def dry_run_text(launch: Launch) -> str:
    lines = [f"# jaxscale tpu launch {launch.experiment}: {launch.slices} x {launch.accelerator}, run_dir "
             f"{launch.run_dir}"]
    if launch.slices > 1:
        lines.append("# multislice: the queued resource's runtime sets MEGASCALE_COORDINATOR_ADDRESS, "
                     "MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT on every worker; "
                     "jax.distributed.initialize() (--distributed) reads them")
    for i, (what, command) in enumerate(plan_commands(launch), 1):
        lines += [f"# {i}. {what}", shlex.join(command)]
    lines += [f"# then: exit 0 -> done; exit {' / '.join(map(str, RESTART_CODES))} (preempted, a worker lost; the "
              f"checkpoint is saved) or the slice taken back "
              f"-> when the queued resource is no longer ACTIVE: "
              f"{shlex.join(delete_command(launch.name, launch.zone, launch.project))}, and from "
              f"step 1 again; else from the start step again (training resumes from the newest checkpoint in "
              f"{launch.run_dir}); ssh lost ({SSH_LOST}) while ACTIVE -> stream again; any other exit code -> stop "
              f"with it (2: a configuration problem, see the log)"]
    return "\n".join(lines)


def run(command: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, text=True, capture_output=capture, check=False)


def queued_state(launch: Launch) -> str:
    result = run(state_command(launch), capture=True)
    return result.stdout.strip() if result.returncode == 0 else "ABSENT"


def provision(launch: Launch) -> None:
    """The queued resource ACTIVE and jaxscale installed on every worker (created when absent)."""
    state = queued_state(launch)
    if state in ("FAILED", "SUSPENDING", "SUSPENDED"):  # preempted or never filled: start over
        run(delete_command(launch.name, launch.zone, launch.project))
        state = "ABSENT"
    if state == "ABSENT" and run(create_command(launch)).returncode:
        raise ConfigError(f"gcloud could not request {launch.name}; see its message above")
    while (state := queued_state(launch)) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED", "ABSENT"):
            raise ConfigError(f"queued resource {launch.name} is {state}; see `{shlex.join(state_command(launch))}`")
        time.sleep(POLL_S)
    for what, command in setup_commands(launch):
        if run(command).returncode:
            raise ConfigError(f"could not {what}; see the messages above")


def launch_run(launch: Launch, max_restarts: int) -> int:
    provision(launch)
    restarts = 0
    while True:
        for _, command in start_commands(launch):
            run(command)
        code = run(follow_command(launch)).returncode
        while code == SSH_LOST and queued_state(launch) == "ACTIVE":  # the connection dropped, not the run
            code = run(follow_command(launch)).returncode
        if code == 0:
            return 0
        taken_back = queued_state(launch) != "ACTIVE"
        if code not in RESTART_CODES and not taken_back:
            print(f"jaxscale tpu: training stopped with exit code {code}; its log is {LOG} on the workers",
                  file=sys.stderr)
            return code
        restarts += 1
        if restarts > max_restarts:
            print(f"jaxscale tpu: preempted {restarts} times; giving up (--max-restarts {max_restarts})",
                  file=sys.stderr)
            return EXIT_PREEMPTED
        print(f"jaxscale tpu: preempted (restart {restarts}); continuing from the newest checkpoint in "
              f"{launch.run_dir}", file=sys.stderr)
        if taken_back:
            provision(launch)
