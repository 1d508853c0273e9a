"""Training: optimizer, sharded state and steps, metrics, and the loop that ties them together."""
from jaxscale.training.loop import TrainResult, train
from jaxscale.training.step import TrainState
from jaxscale.training.trainer import Trainer, build_trainer

__all__ = ["Trainer", "TrainResult", "TrainState", "build_trainer", "train"]
