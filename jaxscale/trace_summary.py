"""What profiled steps spent their device time on, read from the trace `jax.profiler.trace` writes (as
`jaxscale bench --profile` does): per device, kernel time per step by kind, the time no kernel ran, the
collectives no compute hid, and the largest kernels.

The kinds follow GPU kernel names (cuBLAS / XLA Triton matmuls, cuDNN flash attention, NCCL) and XLA's
collective op names; on other devices most kernels count as "other". A CPU trace holds no device kernels: XLA
runs the ops on host threads (a client thread, or the Python thread that dispatched a step run inline), and those
ops stand in for them, as one device "/host:CPU".
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KINDS = ("matmul", "attention", "collective", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered or lowered.startswith(COLLECTIVES):
        return "collective"
    # cuDNN runs only flash attention in jaxscale's step; its helper kernels (dO·O, dQ conversion) count too
    if any(key in lowered for key in ("cudnn", "sdpa", "flash", "fmha")):
        return "attention"
    if any(key in lowered for key in ("nvjet", "gemm", "cublas", "splitk", "cutlass", "xmma")):
        return "matmul"
    return "other"


@dataclass
class DeviceTime:
    """One device's kernels, in milliseconds per profiled step."""

    device: str
    kernel_ms: float  # summed over kernels (kernels on concurrent streams both count)
    busy_ms: float  # with at least one kernel running
    span_ms: float  # from the first kernel's start to the last one's end
    idle_ms: float  # span - busy: launch gaps, waits for the host
    exposed_collective_ms: float  # collective kernels running with no compute kernel beside them
    by_kind: dict[str, float]
    top: list[tuple[str, float, int]]  # (kernel name, ms per step, calls per step), largest first


def newest_trace(directory: str | Path) -> Path:
    traces = sorted(Path(directory).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}: write one with jax.profiler.trace "
                                f"(jaxscale bench --profile DIR)")
    return traces[-1]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered(start: float, end: float, intervals: list[tuple[float, float]]) -> float:
    """How much of [start, end) the merged `intervals` cover."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals if b > start and a < end)


def device_time(device: str, kernels: list[tuple[float, float, str]], steps: int, top: int = 15) -> DeviceTime:
    """One device's summary from its kernels, (start µs, end µs, name) each, over `steps` steps."""
    kinds = [kernel_kind(name) for _, _, name in kernels]
    busy = merged([(s, t) for s, t, _ in kernels])
    compute = merged([(s, t) for (s, t, _), kind in zip(kernels, kinds) if kind != "collective"])
    # Time with a collective running and no compute beside it, counted once however many run at once (on a
    # CPU each device's thread runs its own copy of the same all-reduce).
    exposed = sum((t - s) - covered(s, t, compute)
                  for s, t in merged([(s, t) for (s, t, _), kind in zip(kernels, kinds) if kind == "collective"]))
    by_name, calls, by_kind = Counter(), Counter(), Counter({kind: 0.0 for kind in KINDS})
    for (s, t, name), kind in zip(kernels, kinds):
        by_name[name] += t - s
        calls[name] += 1
        by_kind[kind] += t - s
    per_step = 1e3 * steps  # microseconds in, milliseconds per step out
    busy_us, span_us = sum(t - s for s, t in busy), busy[-1][1] - busy[0][0]
    return DeviceTime(
        device=device, kernel_ms=sum(by_name.values()) / per_step, busy_ms=busy_us / per_step,
        span_ms=span_us / per_step, idle_ms=(span_us - busy_us) / per_step,
        exposed_collective_ms=exposed / per_step, by_kind={k: v / per_step for k, v in by_kind.items()},
        top=[(name, us / per_step, calls[name] // steps) for name, us in by_name.most_common(top)])


def summarize(directory: str | Path, steps: int, top: int = 15) -> list[DeviceTime]:
    """Per device of the newest trace under `directory`, which holds `steps` steps."""
    data = json.loads(gzip.decompress(newest_trace(directory).read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid: name for pid, name in processes.items()  # CUSTOM: a profiler plugin's own events, no chip's
               if "/device:" in name and "/device:CUSTOM:" not in name}
    summaries = []
    for pid, device in sorted(devices.items(), key=lambda item: item[1]):
        kernels = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                   if e.get("ph") == "X" and e.get("pid") == pid]
        if kernels:
            summaries.append(device_time(device, kernels, steps, top))
    if not summaries:  # a CPU run
        cpu_ops = host_xla_ops(events, {pid for pid, name in processes.items() if name.startswith("/host:")})
        if cpu_ops:
            summaries.append(device_time("/host:CPU", cpu_ops, steps, top))
    return summaries


def host_xla_ops(events: list[dict], hosts: set[int]) -> list[tuple[float, float, str]]:
    """The XLA ops a CPU backend ran in the `hosts` processes, (start µs, end µs, name) each: the events its
    thunk executor tags with the HLO instruction (args.hlo_op), on whichever thread ran the step; the runtime's
    own events there (Rendezvous, ThunkExecutor::Execute, "end: ..." markers) carry no such tag."""
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
            if e.get("ph") == "X" and e.get("pid") in hosts and "hlo_op" in (e.get("args") or {})]


def format_summary(summaries: list[DeviceTime]) -> str:
    if not summaries:
        return "no device kernels in the trace (on the CPU, XLA runs the step on host threads)"
    lines = []
    for d in summaries:
        kinds = ", ".join(f"{kind} {d.by_kind[kind]:.2f}" for kind in KINDS)
        lines.append(f"{d.device}: {d.span_ms:.2f} ms per step from the first kernel to the last; busy "
                     f"{d.busy_ms:.2f}, idle {d.idle_ms:.2f}; kernels {d.kernel_ms:.2f} ({kinds}); "
                     f"collectives not hidden {d.exposed_collective_ms:.2f}")
        lines += [f"  {ms:8.3f} ms  x{count:<4d} {name[:100]}" for name, ms, count in d.top]
    return "\n".join(lines)
