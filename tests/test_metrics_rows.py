"""metrics.jsonl is strict JSON even when a loss is NaN, and its readers get the NaN back."""
import json
import math

import numpy as np
import pytest

from jaxscale.config import load_config
from jaxscale.training import train
from jaxscale.training.curves import read_run, summary_line
from jaxscale.training.events import read_metrics
from jaxscale.training.rows import decode_row, encode_row


def strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_a_run_with_a_nan_step_writes_only_strict_json_and_reads_back_its_nan(tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, [f"run_dir={run_dir}", "model.preset=tiny", "train.steps=4", "train.batch_size=8",
                                "train.log_every=1", "train.eval_every=0", "train.progress=false",
                                "guards.inject_nan_at_step=2", "mesh.data=-1"])
    result = train(config)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [strict_json(line) for line in lines]  # raises on a bare NaN or Infinity
    nan_row = next(r for r in rows if r.get("step") == 2 and "loss" in r)
    assert nan_row["loss"] is None and nan_row["nonfinite"]["loss"] == "NaN"
    skipped = next(r for r in rows if r.get("event") == "update_skipped")
    assert skipped["values"] == {"loss": None, "grad_norm": None}
    assert skipped["nonfinite"] == {"values.loss": "NaN", "values.grad_norm": "NaN"}

    read = read_metrics(run_dir)
    by_step = {r["step"]: r for r in read if "loss" in r}
    assert math.isnan(by_step[2]["loss"]) and "nonfinite" not in by_step[2]
    assert all(math.isfinite(by_step[s]["loss"]) for s in (1, 3, 4))
    assert math.isnan(next(r for r in read if r.get("event") == "update_skipped")["values"]["grad_norm"])
    # The rows read back are the rows the run kept in memory.
    written = [r for r in read if "event" not in r]
    assert len(written) == len(result.metrics)
    for back, kept in zip(written, result.metrics):
        assert back.keys() == kept.keys()
        np.testing.assert_equal([back[k] for k in back], [kept[k] for k in kept])
    # The plot's reader sees the skipped step as NaN (drawn as a gap) and reports the skip.
    curves = read_run(run_dir)
    assert np.isnan(curves.loss[1]) and np.isfinite(curves.loss[[0, 2, 3]]).all()
    assert "skipped updates 1" in summary_line(curves)


@pytest.mark.parametrize("row", [
    {"step": 1, "loss": float("inf"), "grad_norm": float("-inf"), "lr": 1e-3},
    {"step": 5, "event": "x", "values": {"loss": float("nan"), "list": [1.0, float("nan")]}, "ok": None},
    {"step": 3, "loss": 2.5},
])
def test_encode_and_decode_round_trip_every_non_finite_value(row):
    line = encode_row(row)
    assert "NaN" not in line.replace('"NaN"', "") and "Infinity" not in line.replace('"Infinity"', "").replace(
        '"-Infinity"', "")
    back = decode_row(strict_json(line))
    np.testing.assert_equal(back, row)


def test_an_old_file_with_a_bare_nan_still_reads(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 3.0}\n')
    rows = read_metrics(tmp_path)
    assert math.isnan(rows[0]["loss"]) and rows[1]["loss"] == 3.0


@pytest.mark.parametrize("nonfinite", ['{"loss": "nan"}', '{"lr": "NaN"}', '["loss"]', '{"a.b": "NaN"}'])
def test_a_nonfinite_field_that_names_no_null_value_is_an_error_with_the_line(tmp_path, nonfinite):
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": null, "lr": 0.1, "nonfinite": {nonfinite}}}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: \"nonfinite\""):
        read_metrics(tmp_path)
