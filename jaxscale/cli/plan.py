"""`jaxscale plan EXPERIMENT --devices N --device-kind KIND`: the best layouts of an experiment on N devices of
a kind from the hardware catalog, with predicted tokens/s, memory per device and the `--set` flags of each."""
from __future__ import annotations

import argparse

from jaxscale.cli.arguments import add_config_arguments
from jaxscale.config import load_config
from jaxscale.errors import ConfigError
from jaxscale.plan_check import compile_check
from jaxscale.planner.plan import rank, with_memory_limit
from jaxscale.planner.rates import rates_for
from jaxscale.training.memory_check import size

GB = 1e9


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="rank layouts (mesh, remat, microbatches, offload) of an experiment on "
                                           "N devices of a kind: predicted tokens/s, memory, --set flags",
                              description=__doc__)
    add_config_arguments(p)
    p.add_argument("--devices", type=int, required=True, help="how many devices (chips, GPUs)")
    p.add_argument("--device-kind", required=True,
                   help="a hardware catalog entry: h100-sxm, h200, tpu-v5e, ... or a short form (H100, v5e), or cpu")
    p.add_argument("--top", type=int, default=5, help="rows to print (default %(default)s)")
    p.add_argument("--check", type=int, default=3, metavar="K",
                   help="compile the K best layouts ahead of time and show their memory, where the device kind "
                        "can be compiled for here: cpu, or TPU kinds through libtpu (default %(default)s; 0: off)")
    p.set_defaults(func=run_plan)
    return p


def format_table(ranked, rates, n_devices: int, top: int) -> str:
    limit = rates.memory_bytes
    lines = [f"{n_devices} x {rates.kind}: step time at {rates.efficiency_note}"
             + (f"; {limit / GB:.1f} GB per device" if limit else "; no per-device memory limit"),
             f"{'#':>2}  {'tokens/s':>11}  {'step':>9}  {'memory/device':>13}  {'compiled':>9}  {'host':>8}  flags"]
    for i, r in enumerate(ranked[:top], 1):
        e = r.estimate
        compiled = "-" if r.compiled_bytes is None else (
            "too big" if r.compiled_bytes == float("inf") else size(r.compiled_bytes))
        lines.append(f"{i:>2}  {e.tokens_per_s:>11,.0f}  {e.step_s * 1e3:>7.1f}ms  {size(e.device_bytes):>13}"
                     f"  {compiled:>9}  {size(e.host_bytes) if e.host_bytes else '-':>8}  {e.candidate.flags()}"
                     + ("" if r.fits else "   (DOES NOT FIT)"))
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Exit code 0 when a layout fits, 1 when none does, 2 for a bad config or device kind."""
    if args.devices < 1 or args.top < 1 or args.check < 0:
        raise ConfigError(f"--devices {args.devices} and --top {args.top} must be >= 1, --check {args.check} >= 0")
    config = load_config(args.experiment, args.overrides)
    rates = rates_for(args.device_kind, config.train.compute_dtype)
    ranked = rank(config, args.devices, rates)
    if not ranked:
        raise ConfigError(f"no layout of {config.name} passes the config checks on {args.devices} devices (the "
                          f"batch, heads and layers must divide over the mesh); try another --devices or "
                          f"train.batch_size")
    if args.check:
        ranked = compile_check(config, ranked, rates, args.devices, args.check)
    print(format_table(ranked, with_memory_limit(rates, config), args.devices, args.top))
    return 0 if ranked[0].fits else 1
