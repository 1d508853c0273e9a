"""The run plan is worked out once per run: a run checks its config against the devices (`validate`) once."""
import pytest
from fault_helpers import TINY

import jaxscale
from jaxscale.training import trainer as trainer_module


@pytest.mark.slow
def test_a_run_validates_its_config_once(tmp_path, monkeypatch):
    calls = []
    validate = trainer_module.validate
    monkeypatch.setattr(trainer_module, "validate", lambda *a, **k: calls.append(a) or validate(*a, **k))
    config = jaxscale.load_config(None, [*TINY, f"run_dir={tmp_path / 'run'}", "train.steps=1"])
    result = jaxscale.train(config)
    assert [row["step"] for row in result.metrics if "loss" in row] == [1]
    assert len(calls) == 1
