"""`model.init_from=run:<dir>`: the model section of another jaxscale run, whose newest finished checkpoint's
parameters a fine-tuning run starts from (`jaxscale.training.run_init` reads them)."""
from __future__ import annotations

import yaml
from etils import epath

from jaxscale.errors import ConfigError
from jaxscale.model.hf_config import SHAPE_KEYS
from jaxscale.run_files import run_path

RUN_PREFIX = "run:"
MODEL_KEYS = SHAPE_KEYS + ("moe",)  # the keys the parameters' shapes and the model's function depend on


def run_directory(spec: str) -> epath.Path:
    directory = run_path(spec.removeprefix(RUN_PREFIX), "model.init_from").expanduser()
    if not directory.is_dir():
        raise ConfigError(f"model.init_from={spec!r}: {directory} is not a directory; give run:<the run_dir of a "
                          f"jaxscale train run>")
    if not (directory / "config.yaml").is_file():
        raise ConfigError(f"model.init_from={spec!r}: {directory} holds no config.yaml, so it is not the run_dir "
                          f"of a jaxscale train run")
    return directory


def run_model_section(directory: epath.Path) -> dict:
    """The model section of the run's config.yaml (as it trained: resolved, every key written)."""
    raw = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8"))
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{directory / 'config.yaml'} has no model section; it is not a jaxscale run's config")
    return model


def model_differences(mine: dict, theirs: dict) -> list[str]:
    """`model.<key>` of each of MODEL_KEYS that `mine` sets (not None) to another value than the run's; of a
    section (moe, rope_scaling) the keys it sets."""

    def differs(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return any(differs(value, b.get(key)) for key, value in a.items() if value is not None)
        return a != b

    return [f"model.{key}={mine[key]!r} (the run has {theirs.get(key)!r})" for key in MODEL_KEYS
            if mine.get(key) is not None and differs(mine[key], theirs.get(key))]


def resolve_run_init_from(section: dict) -> dict:
    """A model config section with `init_from: run:<dir>` completed from that run's model section; a key the
    section sets explicitly must agree with it."""
    spec = section["init_from"]
    directory = run_directory(spec)
    theirs = run_model_section(directory)
    differences = model_differences(section, theirs)
    if differences:
        raise ConfigError(f"model.init_from={spec!r}: the model differs from the run's: "
                          f"{'; '.join(differences)}. With model.init_from=run:<dir> the shape comes from the "
                          f"run; drop those keys or start from another run")
    theirs = {key: value for key, value in theirs.items() if key != "init_from"}
    return {**theirs, **{key: value for key, value in section.items() if value is not None}}
