"""Property: whatever YAML mapping an experiment file holds and whatever `--set` strings come with it,
load_config returns a Config, or raises ConfigError with a message; never another exception. A Config it returns
is written as a run's config.yaml and reads back as the same Config."""
import dataclasses
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxscale.config import Config, load_config, save_config
from jaxscale.errors import ConfigError
from jaxscale.model.config import PRESETS


def dotted_keys(cls, prefix: str = "") -> list[str]:
    """Every config key, as `--set` names it."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys += dotted_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return keys


KEYS = dotted_keys(Config) + ["model.preset", "mesh.preset", "mesh", "sharding.params.embed",
                              "sharding.activations.batch", "data.mixture.builtin"]
SECTIONS = sorted({key.split(".")[0] for key in KEYS})
WORDS = list(PRESETS) + ["cpu-8", "gpu-8", "builtin", "gpt2", "llama", "fsdp", "data", "tensor", "none", "dots",
                         "float32", "bfloat16", "auto", "skip", "rollback", "gpipe", "circular", "-1", "0", "1e-3"]

scalars = (st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(WORDS) | st.text(max_size=12))
keys = st.sampled_from(WORDS) | st.text(max_size=6) | st.integers(-3, 3) | st.booleans() | st.none()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=6)


@st.composite
def experiments(draw) -> dict:
    """A nested mapping built from dotted keys (mostly real ones) and values of any YAML type."""
    raw: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(max_size=10), max_size=8)):
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = draw(values)
    if draw(st.booleans()):  # a whole section replaced by a value of another kind
        raw[draw(st.sampled_from(SECTIONS))] = draw(scalars)
    return raw


overrides = st.one_of(
    st.text(max_size=40),  # anything at all
    st.builds(lambda key, text: f"{key}={text}", st.sampled_from(KEYS) | st.text(max_size=10),
              st.sampled_from(WORDS) | st.text(max_size=20)),
    st.builds(lambda key, value: f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}",
              st.sampled_from(KEYS), values),
)


def check_loads(experiment: str | None, sets: list[str], tmp_dir) -> None:
    try:
        config = load_config(experiment, sets)
    except ConfigError as e:
        assert str(e).strip(), "a ConfigError without a message"
        return
    assert isinstance(config, Config)
    save_config(config, tmp_dir / "config.yaml")  # what a run writes into its run_dir
    again = load_config(str(tmp_dir / "config.yaml"))
    assert dataclasses.replace(again, name=config.name) == config or _has_nan(config.to_dict())


def _has_nan(value) -> bool:  # NaN != NaN: such a config (in a free-form sharding rule) cannot compare equal
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(raw=experiments(), sets=st.lists(overrides, max_size=3))
@example(raw={"model": {"preset": []}}, sets=[])  # found by this test: a TypeError once
@example(raw={"mesh": {"preset": 5}}, sets=[])
def test_any_experiment_mapping_and_overrides_give_a_config_or_a_config_error(tmp_dir, raw, sets):
    path = tmp_dir / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    check_loads(str(path), sets, tmp_dir)


@PROPERTY
@given(sets=st.lists(overrides, min_size=1, max_size=4))
@example(sets=["mesh={0}"])  # found by this test, as were the next ones
@example(sets=["data.mixture={5: 1.0}"])
@example(sets=["train.steps=" + "9" * 400])
@example(sets=["mesh=" + "a" * 300])
def test_any_set_strings_on_the_default_experiment_give_a_config_or_a_config_error(tmp_dir, sets):
    check_loads(None, sets, tmp_dir)


@PROPERTY
@example(content=b"?")  # a mapping whose only key is null
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_experiment_file_content_gives_a_config_or_a_config_error(tmp_dir, content):
    path = tmp_dir / "any.yaml"
    path.write_bytes(content)
    check_loads(str(path), [], tmp_dir)
