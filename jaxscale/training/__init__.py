"""Training: optimizer, sharded state and steps, metrics, and the loop that ties them together."""
from jaxscale.lazy import lazy_exports

# Imported on first use: the loop brings JAX, Flax, Optax and Orbax, which the light modules of this package
# (events, curves) and the commands built on them do not need.
__all__ = ["Trainer", "TrainResult", "TrainState", "build_trainer", "train"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Trainer": "jaxscale.training.trainer", "build_trainer": "jaxscale.training.trainer",
    "TrainResult": "jaxscale.training.loop", "train": "jaxscale.training.loop",
    "TrainState": "jaxscale.training.step"})
