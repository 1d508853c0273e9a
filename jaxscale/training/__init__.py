"""Training: optimizer, sharded state and steps, metrics, and the loop that ties them together."""
from jaxscale.training.loop import Trainer, TrainResult, build_trainer, train
from jaxscale.training.step import TrainState

__all__ = ["Trainer", "TrainResult", "TrainState", "build_trainer", "train"]
