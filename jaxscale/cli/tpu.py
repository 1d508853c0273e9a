"""`jaxscale tpu launch|delete`: train on Cloud TPU VMs through gcloud (jaxscale.tpu_vm)."""
from __future__ import annotations

import argparse
import re
import shlex

from jaxscale import tpu_vm
from jaxscale.cli.arguments import add_overrides_argument
from jaxscale.errors import ConfigError
from jaxscale.tpu_vm import Launch, delete_command, dry_run_text, launch_run, parse_type, run


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tpu", help="train on Cloud TPU VMs through gcloud (create, install, run, "
                                          "restart on preemption)", description=tpu_vm.__doc__)
    actions = p.add_subparsers(dest="action", required=True)
    launch = actions.add_parser("launch", help="request TPU slices, install jaxscale, train until done")
    launch.add_argument("experiment", help="experiment preset name, or a YAML file (copied to the workers)")
    launch.add_argument("--name", required=True, help="queued resource name (its slices: NAME or NAME-i)")
    launch.add_argument("--zone", required=True)
    launch.add_argument("--project", help="default: gcloud's configured project")
    launch.add_argument("--type", required=True, dest="tpu_type", help="v5e-256, v5p-1024, v6e-256, v4-32, ...")
    launch.add_argument("--slices", type=int, default=1, help="slices joined by the data-center network")
    launch.add_argument("--spot", action="store_true", help="spot capacity: cheaper, can be taken back")
    launch.add_argument("--run-dir", required=True, help="gs://BUCKET/PATH for checkpoints, metrics, config "
                                                          "(the workers' run_dir)")
    launch.add_argument("--install", required=True,
                        help="what each worker installs: a pip requirement (\"jaxscale[tpu] @ git+https://...\") "
                             "or the gs:// URL of a jaxscale wheel")
    add_overrides_argument(launch)  # passed to jaxscale train on the workers
    launch.add_argument("--max-restarts", type=int, default=20, help="preemptions survived (default 20)")
    launch.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    launch.set_defaults(func=run_launch)
    delete = actions.add_parser("delete", help="release the queued resource and its slices")
    delete.add_argument("--name", required=True)
    delete.add_argument("--zone", required=True)
    delete.add_argument("--project")
    delete.add_argument("--dry-run", action="store_true")
    delete.set_defaults(func=run_delete)
    return p


def run_launch(args: argparse.Namespace) -> int:
    accelerator, runtime = parse_type(args.tpu_type)
    if not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/.*)?", args.run_dir):
        raise ConfigError(f"--run-dir {args.run_dir}: give a bucket URL (gs://BUCKET/PATH); the workers' disks "
                          f"go with the slice, and a restarted run continues from the checkpoints there")
    if args.slices < 1 or args.max_restarts < 0:
        raise ConfigError("--slices must be >= 1 and --max-restarts >= 0")
    launch = Launch(args.experiment, args.name, args.zone, accelerator, runtime, args.run_dir.rstrip("/"),
                    args.install, args.slices, args.spot, args.project, tuple(args.overrides))
    if args.dry_run:
        print(dry_run_text(launch))
        return 0
    return launch_run(launch, args.max_restarts)


def run_delete(args: argparse.Namespace) -> int:
    command = delete_command(args.name, args.zone, args.project)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return run(command).returncode
