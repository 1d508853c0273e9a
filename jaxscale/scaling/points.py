"""One measured point of a scaling law per run directory: <run_dir>/scaling.json.

N counts the parameters of every matmul, the output head included (`ModelConfig.matmul_params()`): the
parameters whose cost is 6 N FLOPs per trained token, so that C = 6 N D, which the fit's compute-optimal
allocation assumes, is the run's matmul compute. Embedding lookups, position tables, norms and biases are left
out (with tied embeddings the table is counted once, as the head). D is the number of tokens trained
(steps x global batch x sequence length), and the loss is the final evaluation loss.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

SCALING_FILE = "scaling.json"
N_DEFINITION = "matmul parameters incl. the output head (ModelConfig.matmul_params); C = 6 N D"


@dataclass(frozen=True)
class ScalingPoint:
    N: float  # matmul parameters, see the module docstring
    D: float  # tokens trained
    loss: float  # final evaluation loss (nats/token)
    loss_kind: str  # "eval", or "train" when the run logged no evaluation loss
    total_params: int
    flops_per_token: float  # 6N + attention, as used for MFU
    run_dir: str
    n_definition: str = N_DEFINITION

    @property
    def compute(self) -> float:
        """Training compute C = 6 N D, the quantity the compute-optimal allocation is stated in."""
        return 6.0 * self.N * self.D


def final_loss(metrics_rows: list[dict]) -> tuple[float, str]:
    """The last logged `eval_loss`; without one, the mean finite training `loss` of the last 5 log rows (a
    non-finite one is a skipped update). A run that diverged has no final loss: an earlier one is not the run's."""
    evals = [r["eval_loss"] for r in metrics_rows if "eval_loss" in r]
    train = [r["loss"] for r in metrics_rows if "loss" in r]
    if not evals and not train:
        raise ValueError("the run logged neither eval_loss nor loss")
    if evals:
        kind, values, what = "eval", evals[-1:], f"eval_loss is {evals[-1]}"
    else:
        kind, values, what = "train", [v for v in train[-5:] if _finite(v)], f"training losses are {train[-5:]}"
    if not values or not all(_finite(v) for v in values):
        raise ValueError(f"its final {what}, not finite: the run diverged; lower optimizer.learning_rate (--set), "
                         f"or leave this size or budget out")
    return sum(values) / len(values), kind


def write_point(point: ScalingPoint) -> Path:
    path = Path(point.run_dir) / SCALING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(point), indent=2) + "\n")
    return path


def read_point(path: Path) -> ScalingPoint:
    try:
        raw = json.loads(path.read_text())
        point = ScalingPoint(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not a scaling point written by `jaxscale scaling sweep`: {e}") from e
    if not all(_finite(v) and v > 0 for v in (point.N, point.D, point.loss)):
        raise ValueError(f"{path}: N, D and loss must be positive numbers, got {point.N}, {point.D}, {point.loss}")
    return point


def find_points(paths: list[str]) -> list[ScalingPoint]:
    """Points of the given run directories; a directory without scaling.json contributes its sub-directories'."""
    files: list[Path] = []
    for p in map(Path, paths):
        if (p / SCALING_FILE).is_file():
            files.append(p / SCALING_FILE)
        elif p.is_file() and p.name == SCALING_FILE:
            files.append(p)
        elif p.is_dir() and sorted(p.glob(f"*/{SCALING_FILE}")):
            files.extend(sorted(p.glob(f"*/{SCALING_FILE}")))
        else:
            raise FileNotFoundError(f"{p} has no {SCALING_FILE}, nor do its sub-directories")
    resolved = [f.resolve() for f in files]
    twice = sorted({str(f) for f, r in zip(files, resolved) if resolved.count(r) > 1})
    if twice:  # a run counted twice weighs twice in the fit
        raise ValueError(f"{', '.join(twice)} given more than once (a run directory and the sweep directory "
                         f"above it?); give each run once")
    return [read_point(f) for f in files]


def unfinished_runs(paths: list[str]) -> list[Path]:
    """Run directories (they hold a config.yaml) inside the sweep directories among `paths` that have no
    scaling.json yet: runs still training, stopped, or failed."""
    sweeps = [p for p in map(Path, paths) if p.is_dir() and not (p / SCALING_FILE).is_file()]
    return [run for sweep in sweeps for run in sorted(sweep.iterdir())
            if (run / "config.yaml").is_file() and not (run / SCALING_FILE).is_file()]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
