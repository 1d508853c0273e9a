"""Checkpoints of the full training state: saved asynchronously, restored onto any mesh, checked on read."""
from jaxscale.checkpointing.metadata import CheckpointMetadata, RunInfo
from jaxscale.checkpointing.store import CheckpointError, CheckpointStore, DamagedCheckpoint, Restored

__all__ = ["CheckpointError", "CheckpointMetadata", "CheckpointStore", "DamagedCheckpoint", "Restored",
           "RunInfo"]
