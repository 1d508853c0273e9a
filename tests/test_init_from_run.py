"""model.init_from=run:<dir>: a fine-tuning run starts from the parameters of another jaxscale run's newest
finished checkpoint, with fresh optimizer state at step 0; a missing run, a run without checkpoints and another
model shape are refused with exit code 2 before anything is written."""
import json

import jax
import numpy as np
import pytest

import jaxscale
from jaxscale.cli import main
from jaxscale.errors import ConfigError
from jaxscale.training import build_trainer

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=64"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run of 3 steps with checkpoints at steps 2 and 3, and its final parameters."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    config = jaxscale.load_config("default", [*SMALL, "train.steps=3", "checkpoint.every_steps=2",
                                              "train.eval_every=0", "train.progress=false", f"run_dir={run_dir}"])
    result = jaxscale.train(config)
    return run_dir, jax.device_get(result.state.params)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(32)))
    return str(path)


def fine_tune_overrides(spec: str, chat: str, run_dir) -> list[str]:
    return [f"model.init_from={spec}", "posttrain.method=sft", f"posttrain.source={chat}",
            "posttrain.validation_fraction=0", "train.steps=1", "train.batch_size=8", "train.eval_every=0",
            "train.progress=false", f"run_dir={run_dir}"]


@pytest.mark.slow
def test_the_run_starts_from_the_newest_checkpoints_parameters_with_fresh_optimizer_state(pretrained, chat,
                                                                                          tmp_path):
    run_dir, params = pretrained
    config = jaxscale.load_config("sft", fine_tune_overrides(f"run:{run_dir}", chat, tmp_path / "sft"))
    assert (config.model.d_model, config.model.n_layers, config.model.seq_len) == (32, 1, 64)  # the run's shape
    state = build_trainer(config, jax.devices()[:1]).init_state()
    assert int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)  # step 3's, bit for bit
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and not any(np.asarray(x).any() for x in moments)  # AdamW's moments start at zero
    assert jaxscale.train(config).metrics[-1]["step"] == 1  # and it trains


def run_cli(overrides: list[str]) -> int:
    return main(["train", "sft", *[arg for o in overrides for arg in ("--set", o)]])


def test_a_missing_run_a_run_without_checkpoints_and_another_shape_exit_with_2(pretrained, chat, tmp_path, capsys):
    run_dir, _ = pretrained
    out = tmp_path / "out"
    assert run_cli(fine_tune_overrides(f"run:{tmp_path / 'nowhere'}", chat, out)) == 2
    assert "is not a directory" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert run_cli(fine_tune_overrides(f"run:{empty}", chat, out)) == 2
    assert "holds no finished checkpoint" in capsys.readouterr().err

    assert run_cli([*fine_tune_overrides(f"run:{run_dir}", chat, out), "model.d_model=64", "model.n_heads=4"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model=64 (the run has 32)" in err and "model.n_heads=4 (the run has 2)" in err
    assert not out.exists()  # nothing written


def test_a_config_built_in_python_with_another_shape_is_refused_naming_the_keys(pretrained, chat, tmp_path):
    run_dir, _ = pretrained
    config = jaxscale.load_config("sft", fine_tune_overrides(f"run:{run_dir}", chat, tmp_path / "sft"))
    config.model.n_layers = 2
    with pytest.raises(ConfigError, match=r"model.n_layers=2 \(the run has 1\)"):
        jaxscale.train(config)
    assert not (tmp_path / "sft").exists()
