"""`jaxscale estimate`: what a planned training run costs in time, money, energy and CO2e, and whether it fits."""
from __future__ import annotations

import argparse
import dataclasses
import json

from jaxscale.cli.arguments import add_config_arguments
from jaxscale.config import load_config, resolve_mesh_sizes
from jaxscale.cost.catalog import Accelerator, get_accelerator, load_catalog
from jaxscale.cost.estimate import (
    DEFAULT_GRID_GCO2_PER_KWH,
    DEFAULT_MFU,
    DEFAULT_PUE,
    EstimateError,
    TrainingEstimate,
    cheapest,
    estimate_training,
    fastest,
)
from jaxscale.cost.memory import (
    STATE_BYTES_PER_PARAM,
    MemoryEstimate,
    activation_bytes_per_chip,
    state_shard_count,
    training_memory,
)
from jaxscale.errors import ConfigError
from jaxscale.training.events import measured_mfu


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `estimate` on the core CLI's subparsers; the handler is `args.func(args) -> exit code`."""
    p = subparsers.add_parser(
        "estimate", help="training time, cost, energy and CO2e of a planned run",
        description="Estimate training FLOPs (FLOPs/token x tokens, FLOPs/token = 6N + 12 L d T), wall-clock, "
                    "chip-hours, cost at the catalog's on-demand list price, energy from the chips' TDP (an upper "
                    "bound) and CO2e, and check that training state and activations fit in HBM.")
    add_config_arguments(p)
    p.add_argument("--tokens", type=float, required=True, help="tokens to train on, e.g. 20e9")
    p.add_argument("--hardware", help="catalog entry, e.g. tpu-v5p, h100-sxm (see --catalog)")
    p.add_argument("--chips", type=int, required=True, help="number of chips (GPUs or TPU chips)")
    p.add_argument("--mfu", type=float, help=f"model FLOPs utilisation; default: --from-run, else {DEFAULT_MFU}")
    p.add_argument("--from-run", metavar="RUN_DIR", help="take the MFU as the median of a run's metrics.jsonl")
    p.add_argument("--pue", type=float, default=DEFAULT_PUE, help=f"power usage effectiveness (default {DEFAULT_PUE})")
    p.add_argument("--grid-gco2-per-kwh", type=float, default=DEFAULT_GRID_GCO2_PER_KWH,
                   help=f"grid carbon intensity in gCO2e/kWh (default {DEFAULT_GRID_GCO2_PER_KWH:g}, an assumption)")
    p.add_argument("--compare", metavar="HW,HW,...", help="also estimate on these catalog entries, side by side")
    p.add_argument("--zero3", action="store_true", help="shard training state over every chip (ZeRO-3)")
    p.add_argument("--catalog", metavar="PATH", help="YAML file merged over the built-in hardware catalog "
                                                     "(default: $JAXSCALE_HARDWARE)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=run_estimate)
    return p


@dataclasses.dataclass(frozen=True)
class ModelFigures:
    """What the estimate needs from an experiment config, as plain numbers."""
    name: str
    matmul_params: int
    total_params: int
    flops_per_token: float
    seq_len: int
    d_model: int
    n_layers: int
    vocab_size: int
    batch_size: int
    microbatches: int
    remat: str


def run_estimate(args: argparse.Namespace) -> int:
    try:
        catalog = load_catalog(args.catalog)
        hardware_keys = _hardware_keys(args)
        accelerators = [get_accelerator(k, catalog) for k in hardware_keys]
        mfu, mfu_note = _choose_mfu(args.mfu, args.from_run)
        figures, mesh_sizes, mesh_note = _load_experiment(args.experiment, args.overrides, args.chips)
        rows = [_estimate_one(figures, mesh_sizes, a, args, mfu) for a in accelerators]
    except (FileNotFoundError, ValueError) as e:  # EstimateError, a bad catalog or config: input to fix, exit 2
        raise ConfigError(str(e)) from e
    warnings = _batch_warnings(figures, mesh_sizes)
    if args.json:
        estimates = [{**dataclasses.asdict(t), "memory": {**dataclasses.asdict(m), "fits": m.fits}} for t, m in rows]
        print(json.dumps({"experiment": dataclasses.asdict(figures), "mesh": mesh_sizes, "mesh_source": mesh_note,
                          "mfu_source": mfu_note, "warnings": warnings, "estimates": estimates}, indent=2))
        return 0
    print(_describe_model(figures, args.tokens, mfu, mfu_note, args))
    print(f"  mesh            {' x '.join(f'{k}={v}' for k, v in mesh_sizes.items())} ({mesh_note})")
    for warning in warnings:
        print(f"  warning: {warning}")
    if args.hardware:
        estimate, memory = rows[0]
        print(_describe_one(estimate, memory, accelerators[0], args.zero3))
    if args.compare:
        print(_compare_table(rows))  # --hardware, when given, leads the table
    return 0


def _hardware_keys(args: argparse.Namespace) -> list[str]:
    compare = [k.strip() for k in (args.compare or "").split(",") if k.strip()]
    if not args.hardware and not compare:
        raise EstimateError("give --hardware (a catalog entry such as h100-sxm or tpu-v5p) or --compare A,B,...")
    return list(dict.fromkeys(([args.hardware] if args.hardware else []) + compare))  # each entry once


def _choose_mfu(flag: float | None, run_dir: str | None) -> tuple[float, str]:
    if flag is not None and run_dir:
        raise EstimateError("--mfu and --from-run both set the MFU; give one of them")
    if flag is not None:
        return flag, "from --mfu"
    if run_dir:
        mfu = measured_mfu(run_dir)
        if mfu is None:
            raise EstimateError(f"{run_dir}/metrics.jsonl has no non-null mfu (CPU runs log none); give --mfu")
        if not 0 < mfu <= 1:  # measured against a catalog peak that is too low
            raise EstimateError(f"the median MFU of {run_dir} is {mfu:.3g}, outside (0, 1]: the peak FLOP/s it was "
                                f"measured against is wrong; give --mfu")
        return mfu, f"median over the log steps of {run_dir}"
    return DEFAULT_MFU, "default: no --mfu or --from-run given"


def _load_experiment(experiment: str | None, overrides: list[str], chips: int
                     ) -> tuple[ModelFigures, dict[str, int], str]:
    """The model's figures, the mesh axis sizes over `chips`, and where that mesh came from."""
    config = load_config(experiment, overrides)
    m, t = config.model, config.train
    figures = ModelFigures(name=config.name, matmul_params=m.matmul_params(), total_params=m.total_params(),
                           flops_per_token=m.flops_per_token(), seq_len=m.seq_len, d_model=m.d_model,
                           n_layers=m.n_layers, vocab_size=m.vocab_size, batch_size=t.batch_size,
                           microbatches=t.microbatches, remat=t.remat)
    try:
        return figures, resolve_mesh_sizes(config.mesh, chips), "the experiment's mesh"
    except ConfigError:
        pass
    try:  # a mesh written for another device count: keep its model axes, fill the chips with data parallelism
        mesh_sizes = resolve_mesh_sizes(dataclasses.replace(config.mesh, data=-1), chips)
    except ConfigError as e:
        raise EstimateError(f"the mesh of experiment {config.name} cannot be spread over --chips {chips}: {e}; "
                            f"choose one with --set mesh=PRESET (`jaxscale presets` lists them)") from None
    return figures, mesh_sizes, (f"the experiment's mesh is for {_mesh_devices(config.mesh.sizes())} device(s): "
                                 f"its fsdp, tensor, pipeline sizes kept, data axis filled to {chips} chips")


def _batch_warnings(f: ModelFigures, mesh_sizes: dict[str, int]) -> list[str]:
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes.get("expert", 1) * f.microbatches
    if f.batch_size % shards == 0:
        return []
    return [(f"train.batch_size={f.batch_size} does not split over data x fsdp x expert x microbatches = {shards}; a real "
             f"run needs a multiple of {shards} (--set train.batch_size=...). Memory below assumes "
             f"{f.batch_size / shards:.3g} sequences per chip.")]


def _mesh_devices(sizes: dict[str, int]) -> str:
    product = 1
    for size in sizes.values():
        product *= size
    return str(product)


def _estimate_one(figures: ModelFigures, mesh_sizes: dict[str, int], accelerator: Accelerator,
                  args: argparse.Namespace, mfu: float) -> tuple[TrainingEstimate, MemoryEstimate]:
    estimate = estimate_training(figures.flops_per_token, args.tokens, accelerator, args.chips, mfu,
                                 pue=args.pue, grid_gco2_per_kwh=args.grid_gco2_per_kwh)
    activations = activation_bytes_per_chip(figures.seq_len, figures.d_model, figures.n_layers, figures.vocab_size,
                                            figures.batch_size, mesh_sizes, figures.microbatches, figures.remat)
    memory = training_memory(figures.total_params, state_shard_count(mesh_sizes, args.zero3), activations,
                             accelerator.hbm_bytes)
    return estimate, memory


# ----------------------------------------------------------------------------------------------------------
# Text output


def _describe_model(f: ModelFigures, tokens: float, mfu: float, mfu_note: str, args: argparse.Namespace) -> str:
    return "\n".join([
        (f"experiment {f.name}: N = {_si(f.matmul_params)} matmul parameters ({_si(f.total_params)} in all), "
         f"{f.flops_per_token:.3g} FLOPs/token (6N + 12 L d T)"),
        f"  tokens          D = {tokens:.3g}",
        f"  training FLOPs  {f.flops_per_token * tokens:.3g}",
        f"  MFU             {mfu:.3f} ({mfu_note})",
        f"  PUE {args.pue:g}, grid {args.grid_gco2_per_kwh:g} gCO2e/kWh"
        + (" (defaults: pass your data centre's figures)" if (args.pue, args.grid_gco2_per_kwh)
           == (DEFAULT_PUE, DEFAULT_GRID_GCO2_PER_KWH) else ""),
    ])


def _describe_one(e: TrainingEstimate, m: MemoryEstimate, a: Accelerator, zero3: bool) -> str:
    lines = [
        f"on {e.chips} x {a.key} ({a.name}), peak {e.peak_flops_per_chip / 1e12:g} TFLOP/s dense bf16 per chip",
        f"  wall-clock      {_duration(e.seconds)}",
        f"  chip-hours      {_amount(e.chip_hours)}",
    ]
    if e.cost_usd is not None:
        lines.append(f"  cost            ${_amount(e.cost_usd)} at ${e.price_usd_per_chip_hour:g}/chip-hour "
                     f"(on-demand list price as of {a.price_date}, and prices change; source: "
                     f"{a.sources.get('price_usd_per_chip_hour', 'not given')})")
    else:
        lines.append(f"  cost            unknown: the catalog has no price for {a.key} (add one with --catalog)")
    if e.energy_kwh is not None:
        lines.append(f"  energy          {_amount(e.energy_kwh)} kWh = chip-hours x TDP {e.tdp_watts:g} W x PUE {e.pue:g} "
                     f"(TDP is an upper bound on the chips' draw; hosts and network not included)")
        lines.append(f"  CO2e            {_amount(e.co2e_kg)} kg at {e.grid_gco2_per_kwh:g} gCO2e/kWh")
    else:
        lines.append(f"  energy, CO2e    unknown: the catalog has no tdp_watts for {a.key} "
                     f"({a.sources.get('tdp_watts', 'not given')})")
    lines.append(_describe_memory(m, zero3))
    return "\n".join(lines)


def _describe_memory(m: MemoryEstimate, zero3: bool) -> str:
    sharding = "every chip (--zero3)" if zero3 else "fsdp x tensor x pipeline"
    verdict = ("HBM size unknown" if m.fits is None else
               f"{'fits in' if m.fits else 'does NOT fit in'} {m.hbm_bytes / 1e9:g} GB HBM")
    return (f"  memory per chip {_gb(m.total_bytes_per_chip)}: training state {STATE_BYTES_PER_PARAM} B/param "
            f"(f32 weights 4 + grads 4 + Adam 8) x {_si(m.params)} params / {m.state_shards} chips ({sharding}) "
            f"= {_gb(m.state_bytes_per_chip)}, activations ~{_gb(m.activation_bytes_per_chip)} (rough: 16-bit, "
            f"no attention scores kept, compiler temporaries not counted) -> {verdict}")


def _compare_table(rows: list[tuple[TrainingEstimate, MemoryEstimate]]) -> str:
    header = ("hardware", "chips", "peak TF/s", "wall-clock", "chip-hours", "cost $", "energy kWh", "CO2e kg",
              "mem/chip", "fits")
    table = [header]
    for e, m in rows:
        table.append((e.hardware, str(e.chips), f"{e.peak_flops_per_chip / 1e12:g}", _duration(e.seconds),
                      _amount(e.chip_hours), _or_unknown(e.cost_usd),
                      _or_unknown(e.energy_kwh), _or_unknown(e.co2e_kg),
                      _gb(m.total_bytes_per_chip), {True: "yes", False: "NO", None: "?"}[m.fits]))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table[1:]]
    estimates = [e for e, _ in rows]
    best_cost, best_time = cheapest(estimates), fastest(estimates)
    lines.append(f"cheapest: {best_cost.hardware} (${_amount(best_cost.cost_usd)})" if best_cost
                 else "cheapest: unknown (no prices in the catalog)")
    lines.append(f"fastest:  {best_time.hardware} ({_duration(best_time.seconds)}), at the same chip count and MFU")
    return "\n".join(lines)


def _or_unknown(value: float | None) -> str:
    return "?" if value is None else _amount(value)


def _amount(x: float) -> str:
    """Whole numbers with thousands separators from 100 up; three significant digits below."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
