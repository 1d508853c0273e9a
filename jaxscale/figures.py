"""The file a figure goes to, checked before the work that draws it (a scaling fit can take minutes)."""
from __future__ import annotations

from pathlib import Path

from jaxscale.errors import ConfigError
from jaxscale.extras import require


def figure_path(path: str | Path, option: str, example: str) -> Path:
    """`path` as the figure will be written: a name without an extension gets .png, as matplotlib's savefig
    would add unasked. `option` (e.g. "--out") and `example` (a file name) go into the error messages."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name such as {path / example}")
    suffix = path.suffix[1:].lower()
    if not suffix:
        return path.with_name(path.name + ".png")
    backend_bases = require("matplotlib.backend_bases", "plot", "drawing figures")
    if suffix not in backend_bases.FigureCanvasBase.get_supported_filetypes():
        raise ConfigError(f"{option} {path}: a figure cannot be written as .{suffix}; end the name in .png, .pdf "
                          f"or .svg")
    return path
