"""Optional dependencies: each comes with an extra of the jaxscale package, which the error names when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

from jaxscale.errors import ConfigError


class MissingDependency(ConfigError):
    """A feature needs a package that is not installed; the message says which extra installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` for `purpose` (e.g. "drawing training curves"), or say to install jaxscale[extra]."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.partition(".")[0]
        raise MissingDependency(f"{purpose} needs {package}, which is not installed: pip install "
                                f"'jaxscale[{extra}]'") from e
