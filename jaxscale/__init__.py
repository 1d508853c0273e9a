"""jaxscale: sharded transformer training on any logical device mesh.

    import jaxscale
    config = jaxscale.load_config("default", ["train.steps=50"])
    result = jaxscale.train(config)          # final state and the metrics rows

The pieces, for writing your own loop: `jaxscale.config` (typed config), `jaxscale.mesh.build_mesh`,
`jaxscale.model.Model`, `jaxscale.training.build_trainer` (sharded state and compiled steps).
"""
from jaxscale.config import Config, load_config
from jaxscale.errors import ConfigError
from jaxscale.training import TrainResult, build_trainer, train

__all__ = ["Config", "ConfigError", "TrainResult", "build_trainer", "load_config", "train"]
