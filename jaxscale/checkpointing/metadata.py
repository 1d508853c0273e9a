"""What a checkpoint records besides the arrays: enough to resume exactly, to check what was read, and to
know later what run wrote it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax

from jaxscale.checkpointing.fingerprint import leaf_paths


@dataclass
class RunInfo:
    """The parts of the metadata that the training loop knows; the store adds the step and the arrays."""

    seed: int  # the only random state: the initial parameters, the data order and each step's key derive from it
    mesh: dict[str, int]  # resolved axis sizes of the mesh that wrote the checkpoint
    microbatches: int
    per_device_batch: int  # sequences per device per microbatch: what an elastic restart keeps
    process_count: int
    skipped_batches: list[int]  # batch indices that rollbacks took out of the data stream
    data_rows: int  # examples (rows) of the training data read so far: where the next batch starts
    config: dict[str, Any]


@dataclass
class CheckpointMetadata(RunInfo):
    step: int  # updates done; the state holds their result
    data_position: int  # the index of the next batch to read (batch k is a pure function of k)
    arrays: dict[str, dict[str, Any]]  # leaf path -> {"shape", "dtype", "fingerprint"}
    saved_at: str  # UTC, ISO 8601

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckpointMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        if "data_rows" not in raw and "data_position" in raw:  # written before data_rows existed
            raw = {**raw, "data_rows": raw["data_position"] * raw["config"]["train"]["batch_size"]}
        missing = names - raw.keys()
        if missing:
            raise ValueError(f"metadata lacks {', '.join(sorted(missing))}")
        return cls(**{k: raw[k] for k in names})


def array_layout(tree) -> dict[str, str]:
    """Leaf path -> 'dtype[shape]', for arrays or for jax.ShapeDtypeStruct targets."""
    leaves = jax.tree.leaves(tree)
    return {path: f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in zip(leaf_paths(tree), leaves)}


def layout_differences(saved: dict[str, dict[str, Any]], expected: dict[str, str],
                       limit: int = 5) -> list[str]:
    """How the saved arrays differ from the ones this configuration trains: empty when they match."""
    saved_layout = {path: f"{a['dtype']}{list(a['shape'])}" for path, a in saved.items()}
    paths = list(expected) + [path for path in saved_layout if path not in expected]  # parameters first
    differences = [f"{path}: checkpoint has {saved_layout.get(path, 'nothing')}, this run needs "
                   f"{expected.get(path, 'nothing')}"
                   for path in paths if saved_layout.get(path) != expected.get(path)]
    if len(differences) > limit:
        return differences[:limit] + [f"... and {len(differences) - limit} more"]
    return differences
