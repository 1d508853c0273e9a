"""`jaxscale report RUN_DIR`: a run in a few lines, from what it left in its directory (metrics.jsonl,
goodput.jsonl, summary.json, config.yaml); no JAX is loaded."""
from __future__ import annotations

import json
import os

import yaml
from etils import epath

from jaxscale.errors import ConfigError
from jaxscale.observe import goodput, stragglers
from jaxscale.run_files import run_path
from jaxscale.training.events import read_metrics


def read_json(path: epath.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON ({e}); it is rewritten when a training session of the run ends") \
            from e


def planned_steps(run_dir: epath.Path) -> int | None:
    path = run_dir / "config.yaml"
    try:
        return int(yaml.safe_load(path.read_text())["train"]["steps"]) if path.is_file() else None
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def report(run_dir: str | os.PathLike) -> str:
    run_dir = run_path(run_dir, "RUN_DIR")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: give the run_dir of a jaxscale train run "
                          f"(runs/<name> by default)")
    try:
        rows = read_metrics(run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    trained = [r for r in rows if "event" not in r and "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    events = [r for r in rows if "event" in r]
    summary = read_json(run_dir / "summary.json")
    lines = []
    last = trained[-1] if trained else {}
    steps, planned = last.get("step", 0), planned_steps(run_dir)
    restarts = sum(1 for e in events if e["event"] == "resume")
    head = f"{run_dir}: {steps} steps" + (f" of {planned}" if planned else "")
    if last.get("tokens") is not None:
        head += f", {tokens_trained(rows):,} tokens"
    lines.append(head + f", {restarts} restart{'s' if restarts != 1 else ''}")
    if trained:
        text = f"loss {trained[0]['loss']:.3f} (step {trained[0]['step']}) -> {last['loss']:.3f} (step {steps})"
        if evals:
            text += f", eval loss {evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})"
        lines.append(text)
    account = goodput.account(run_dir)
    lines.append(goodput.describe(account) if account else "goodput: not recorded (no goodput.jsonl)")
    reported = [e for e in events if e["event"] == "straggler"]
    lines += [f"straggler at step {e['step']}: {stragglers.describe(e)}" for e in reported] or [
        "stragglers: none reported"]
    lines.append(cost_line(summary))
    return "\n".join(lines)


def tokens_trained(rows: list[dict]) -> int:
    """Tokens over every session: each session's rows count from its own start."""
    total, session = 0, 0
    for row in rows:
        if row.get("event") in ("start", "resume"):
            total, session = total + session, 0
        elif "loss" in row and row.get("tokens") is not None:
            session = row["tokens"]
    return total + session


def cost_line(summary: dict) -> str:
    if not summary:
        return "cost and energy: no summary.json yet (written when a training session ends)"
    parts = [f"last session {summary['wall_s']:.1f} s on {summary['chips']} x {summary.get('hardware') or 'unknown'}"]
    if summary.get("cost_usd") is not None:
        parts.append(f"${summary['cost_usd']:.2f} at ${summary['price_usd_per_chip_hour']}/chip-hour "
                     f"({summary['price_date']})")
    if summary.get("energy_kwh") is not None:
        parts.append(f"{summary['energy_kwh']:.3f} kWh measured ({summary['j_per_token']:.3g} J/token)")
    elif summary.get("tdp_bound_kwh") is not None:
        parts.append(f"energy not measured, at most {summary['tdp_bound_kwh']:.3f} kWh (TDP)")
    else:
        parts.append("energy not measured")
    return "cost and energy: " + ", ".join(parts)
