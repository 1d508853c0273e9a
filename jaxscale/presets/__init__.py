"""Named experiment and mesh presets: the YAML files shipped in this package, and a user's own beside them.

A name is looked up in `./experiments/` or `./meshes/` of the working directory first (a project's own
presets), then in the files installed with jaxscale (`jaxscale/presets/experiments/`, `.../meshes/`), so
`jaxscale train gpt2-124m` works from any directory once jaxscale is installed, from a wheel or a checkout.
"""
from __future__ import annotations

import re
from pathlib import Path

INSTALLED = Path(__file__).resolve().parent
KINDS = {"experiments": "experiment", "meshes": "mesh"}  # folder -> what one file in it is called


def preset_dirs(folder: str) -> list[Path]:
    """Where presets of `folder` ("experiments" or "meshes") are looked up, in order."""
    return [Path.cwd() / folder, INSTALLED / folder]


def find_preset(name: str, folder: str) -> Path | None:
    for directory in preset_dirs(folder):
        path = directory / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def known_presets(folder: str) -> dict[str, Path]:
    """Name -> file for every preset of `folder`; a working-directory file hides an installed one of its name."""
    found: dict[str, Path] = {}
    for directory in preset_dirs(folder):
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def summary(path: Path) -> str:
    """The first sentence of the comment block that opens a preset file ("" when it has none)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    match = re.match(r"(.+?\.)(\s|$)", text)
    return match.group(1) if match else text


def list_presets() -> str:
    """One line per preset, experiments then meshes, as `jaxscale presets` prints them."""
    out = []
    for folder in KINDS:
        presets = known_presets(folder)
        out.append("experiments (jaxscale train NAME):" if folder == "experiments" else
                   "meshes (jaxscale train --set mesh=NAME):")
        width = max((len(name) for name in presets), default=0)
        for name, path in presets.items():
            where = "" if path.parent.parent == INSTALLED else f"  [{path}]"
            out.append(f"  {name:<{width}}  {summary(path)}{where}")
    return "\n".join(out)
