"""Where metric rows go besides metrics.jsonl: TensorBoard event files (tensorboardX) and Weights & Biases.

Only process 0 writes the global metrics; per-process figures (stragglers) arrive as rows whose keys already
carry a `host/<i>/` tag. metrics.jsonl stays the run's record: resume, `jaxscale plot` and `jaxscale report`
read it, so `jsonl` is always among the writers.

In a bucket (run_dir=gs://) TensorBoard's event files are written to a local folder and copied to
<run_dir>/tensorboard every TENSORBOARD_UPLOAD_S and at the end (tensorboardX writes gs:// only through
google-cloud-storage, which jaxscale does not install); W&B keeps its own local files in ./wandb there.
"""
from __future__ import annotations

import importlib.util
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml
from etils import epath

from jaxscale.errors import ConfigError
from jaxscale.extras import require
from jaxscale.run_files import StagedDirectory, is_url

WRITERS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under the run directory: `tensorboard --logdir RUN_DIR`
TENSORBOARD_UPLOAD_S = 60.0  # a run directory in a bucket gets the event files this often (each copied whole)


@dataclass
class TrackingConfig:
    writers: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "jaxscale"  # W&B mode (online, offline) follows WANDB_MODE, as W&B's own tools do

    def __post_init__(self):
        unknown = [w for w in self.writers if w not in WRITERS]
        if unknown:
            raise ConfigError(f"tracking.writers: unknown {', '.join(map(repr, unknown))}; choose from "
                              f"{', '.join(WRITERS)}, e.g. --set tracking.writers=[jsonl,tensorboard]")
        if "jsonl" not in self.writers:
            raise ConfigError(f"tracking.writers={self.writers} leaves out jsonl: metrics.jsonl is the run's record "
                              f"(resume, plot and report read it); keep it, e.g. "
                              f"--set tracking.writers=[jsonl,{','.join(self.writers) or 'tensorboard'}]")
        # Checked here, before a run changes anything in its directory; imported when the run opens them.
        for writer, module in (("tensorboard", "tensorboardX"), ("wandb", "wandb")):
            if writer in self.writers and importlib.util.find_spec(module) is None:
                raise ConfigError(f"tracking.writers names {writer}, which needs {module}: pip install "
                                  f"'jaxscale[{writer}]', or leave {writer} out of tracking.writers")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers, nested keys joined by '/', without its step."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values TensorBoard's hparams take (numbers, strings, booleans); lists as text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[prefix + key] = value
        elif value is not None:
            out[prefix + key] = str(value)
    return out


class TensorBoardWriter:
    def __init__(self, run_dir: epath.Path, config: dict):
        require("tensorboardX", "tensorboard", "TensorBoard tracking")
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self.staged = StagedDirectory(epath.Path(run_dir) / TENSORBOARD_DIR)
        self.uploaded_at = time.monotonic()
        self.writer = SummaryWriter(str(self.staged.local))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        # The hparams summaries go into this run's own event file (SummaryWriter.add_hparams would start a run
        # of its own in a subfolder).
        for summary in hparams(flat_config(config), {"loss": None, "eval_loss": None}):
            self.writer.file_writer.add_summary(summary)

    def write(self, row: dict[str, Any]) -> None:
        if "event" in row:
            self.writer.add_text("events", f"{row['event']}: " + ", ".join(
                f"{k}={v}" for k, v in row.items() if k not in ("step", "event")), row["step"])
            return
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        if is_url(self.staged.target) and time.monotonic() - self.uploaded_at >= TENSORBOARD_UPLOAD_S:
            self.writer.flush()
            self.staged.upload()
            self.uploaded_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        self.staged.upload(remove=True)


class WandbWriter:
    def __init__(self, run_dir: epath.Path, config: dict, project: str, name: str):
        require("wandb", "wandb", "W&B tracking")
        import wandb

        # One W&B run per jaxscale run: a restart continues it under the id kept in the run directory.
        id_file = epath.Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                              dir=None if is_url(run_dir) else str(run_dir),
                              config=config)

    def write(self, row: dict[str, Any]) -> None:
        if "event" in row:
            return  # events stay in metrics.jsonl; W&B steps must not go back, which a resume's rows would
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The writers a run's config names (other than metrics.jsonl, which MetricsLogger keeps); open on process 0
    only. `write(row)` takes every row MetricsLogger writes."""

    def __init__(self, tracking: TrackingConfig, run_dir: epath.Path, config: dict, name: str, is_main_process: bool):
        self.writers: list = []
        if not is_main_process:
            return
        if "tensorboard" in tracking.writers:
            self.writers.append(TensorBoardWriter(run_dir, config))
        if "wandb" in tracking.writers:
            self.writers.append(WandbWriter(run_dir, config, tracking.wandb_project, name))

    def write(self, row: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write(row)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
