"""jaxscale: sharded transformer training on any logical device mesh.

    import jaxscale
    config = jaxscale.load_config("default", ["train.steps=50"])
    result = jaxscale.train(config)          # final state and the metrics rows

The pieces, for writing your own loop: `jaxscale.config` (typed config), `jaxscale.mesh.build_mesh`,
`jaxscale.model.Model`, `jaxscale.training.build_trainer` (sharded state and compiled steps).
"""
from jaxscale.errors import ConfigError
from jaxscale.lazy import lazy_exports

# Imported on first use: `import jaxscale` (or `import jaxscale.data`) then loads neither JAX nor Orbax
# (tests/test_imports.py).
__all__ = ["Config", "ConfigError", "TrainResult", "build_trainer", "load_config", "train"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Config": "jaxscale.config", "load_config": "jaxscale.config",
    "TrainResult": "jaxscale.training.loop", "build_trainer": "jaxscale.training.trainer",
    "train": "jaxscale.training.loop"})
