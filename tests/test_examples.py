"""The examples in examples/, run in a short form: each trains a model of the user's own through jaxscale.train."""
import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Linen modules) look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("linen", [pytest.param(False, marks=pytest.mark.slow), True])
def test_digits_classifier_learns_on_a_mixed_mesh(tmp_path, linen):
    out = example("digits").main(["--steps", "60", "--run-dir", str(tmp_path)] + (["--linen"] if linen else []))
    assert out["accuracy"] > 0.6  # 10 classes; ~0.9 by 100 steps, 97% at the default 300


@pytest.mark.slow
def test_digits_classifier_reaches_90_percent(tmp_path):
    assert example("digits").main(["--run-dir", str(tmp_path)])["accuracy"] >= 0.9


@pytest.mark.slow  # about a minute: two models compiled and trained
def test_own_decoder_trains_next_to_the_builtin_one(tmp_path):
    losses = example("own_decoder").main(["--steps", "20", "--run-dir", str(tmp_path), "--mesh", "data=4,fsdp=2"])
    for name in ("yours", "built-in"):
        assert losses[name][-1] < losses[name][0] - 0.5


@pytest.mark.slow
def test_a_user_model_killed_mid_run_resumes_to_the_same_bits(tmp_path):
    """The NNX digits model (with dropout: per-step randomness) SIGKILLed after a checkpoint and run again ends
    bitwise equal to a run that was never interrupted."""
    import signal
    import subprocess
    import sys

    import jax
    import numpy as np
    from fault_helpers import checkpoint_steps, environment, wait_for

    settings = ["--steps", "40", "--set", "checkpoint.every_steps=10", "--set", "checkpoint.every_minutes=0",
                "--set", "train.log_every=1", "--set", "train.progress=false"]

    def command(run_dir):
        return [sys.executable, str(EXAMPLES / "digits.py"), "--run-dir", str(run_dir), *settings]

    env = environment(tmp_path, 8)
    reference = subprocess.run(command(tmp_path / "reference"), env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=log_file, stderr=log_file)
    wait_for(lambda: checkpoint_steps(tmp_path / "killed") and checkpoint_steps(tmp_path / "killed")[-1] >= 20,
             process, 600, "the step-20 checkpoint", log_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(command(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint" in resumed.stderr

    digits = example("digits")
    from jaxscale.config import load_config
    from jaxscale.data.records import RecordData
    from jaxscale.training import build_trainer

    def final_params(run_dir):
        config = load_config(str(run_dir / "config.yaml"))
        batch = RecordData(digits.digits_split()[0], seed=0).example_batch(config.train.batch_size)
        trainer = build_trainer(config, jax.devices(), model=lambda rngs: digits.Mixer(rngs),
                                loss_fn=digits.loss_fn, example_batch=batch)
        return jax.device_get(trainer.restore().state.params)

    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "killed"),
                 final_params(tmp_path / "reference"))


@pytest.mark.slow  # a few minutes: a short pretraining, SFT and DPO, each exported and evaluated
def test_finetuning_raises_exact_match_and_preference_accuracy(tmp_path):
    out = example("finetune_arithmetic").main(["--work", str(tmp_path), "--pretrain-steps", "100",
                                               "--sft-steps", "250", "--dpo-steps", "60", "--control"])
    assert out["exact_match_pretrained"] <= 0.02
    assert out["exact_match_sft"] > out["exact_match_pretrained"]
    assert out["near_miss_accuracy_sft"] > 0.6
    # DPO on the SFT model's own mistakes: on held-out prompts it prefers the sum over its old wrong answer,
    # more often than SFT continued on the same prompts' right answers does (65% against 21% at the defaults)
    assert out["own_mistake_accuracy_dpo"] > out["own_mistake_accuracy_control"] > out["own_mistake_accuracy_sft"]
