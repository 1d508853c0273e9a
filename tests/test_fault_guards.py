"""The update guard: a NaN injected into the real jitted step leaves the state as it was; loss spikes are
caught against the running average."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscale.config import GuardsConfig, load_config
from jaxscale.data import build_dataset
from jaxscale.training import build_trainer
from jaxscale.training.batches import to_global
from jaxscale.training.guards import GuardMonitor, guard_updates


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_nan_injected_into_the_jitted_step_skips_that_update_and_keeps_the_state_bitwise(tmp_path):
    config = load_config(None, ["model.seq_len=32", "model.n_layers=1", "model.d_model=32", "mesh.data=1",
                                "train.batch_size=4", "guards.inject_nan_at_step=2"])
    trainer = build_trainer(config, jax.devices()[:1])
    dataset = build_dataset(config.data, config.model.seq_len, cache_dir=str(tmp_path / "cache"))
    state = trainer.init_state()
    monitor = GuardMonitor()
    state, metrics = trainer.train_step(state, to_global(dataset.batch(0, 4), trainer.data_sharding, 4))
    assert monitor.push(0, metrics) is None
    before = host((state.params, state.opt_state.inner))
    state, metrics = trainer.train_step(state, to_global(dataset.batch(1, 4), trainer.data_sharding, 4))
    assert monitor.push(1, metrics) is None  # the verdict of step 1, read one step late
    event = monitor.flush()
    assert event.step == 2 and event.reason == "nonfinite"
    assert np.isnan(event.loss) and np.isnan(event.grad_norm)
    assert int(metrics["skip_reason"]) == 1 and int(metrics["skipped_updates"]) == 1 and int(state.step) == 2
    for kept, old in zip(host((state.params, state.opt_state.inner)), before):
        np.testing.assert_array_equal(kept, old)
    state, metrics = trainer.train_step(state, to_global(dataset.batch(2, 4), trainer.data_sharding, 4))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skip_reason"]) == 0
    assert not all(np.array_equal(a, b) for a, b in zip(host(state.params), before[:len(host(state.params))]))


def test_a_loss_spike_over_the_running_average_is_skipped_and_does_not_move_the_average():
    tx = guard_updates(optax.sgd(0.1), GuardsConfig(spike_factor=2.0, spike_window=3))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.full(3, 0.5)}
    update = jax.jit(tx.update)
    for loss in (1.0, 1.2, 0.9):  # the window fills
        updates, state = update(grads, state, params, value=jnp.float32(loss))
        assert int(state.skip_reason) == 0
    updates, spiked = update(grads, state, params, value=jnp.float32(5.0))
    assert int(spiked.skip_reason) == 2 and int(spiked.skipped) == 1
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    assert float(spiked.loss_average) == float(state.loss_average)
    updates, after = update(grads, spiked, params, value=jnp.float32(1.5))  # 1.5 < 2 x average: applied
    assert int(after.skip_reason) == 0 and int(after.applied) == 4
    np.testing.assert_allclose(updates["w"], np.full(3, -0.05))


def test_an_early_high_loss_is_not_a_spike_before_the_window_is_full():
    tx = guard_updates(optax.sgd(0.1), GuardsConfig(spike_factor=2.0, spike_window=3))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for loss in (1.0, 9.0):
        _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(loss))
        assert int(state.skip_reason) == 0


@pytest.mark.slow
def test_a_run_whose_updates_keep_being_skipped_stops_with_exit_code_3_and_keeps_its_checkpoint(tmp_path, capsys):
    """learning_rate=1e6: the loss turns NaN within a few steps and every later update is skipped. The run stops
    at guards.max_consecutive_skips with exit code 3 and a `diverged` event; the newest checkpoint is a good one."""
    from fault_helpers import TINY, checkpoint_steps, cli_args

    from jaxscale.cli import main
    from jaxscale.training.events import read_metrics

    run_dir = tmp_path / "run"
    code = main(["train", *cli_args([*TINY, f"run_dir={run_dir}", "optimizer.learning_rate=1e6", "train.steps=100",
                                     "checkpoint.every_steps=5", "guards.max_consecutive_skips=4"])])
    assert code == 3
    assert "updates in a row were skipped" in capsys.readouterr().err
    diverged = [row for row in read_metrics(run_dir) if row.get("event") == "diverged"]
    assert len(diverged) == 1 and diverged[0]["skips"] >= 4 and diverged[0]["exit_code"] == 3
    newest = checkpoint_steps(run_dir)[-1]
    assert diverged[0]["checkpoint"] == str(run_dir / "checkpoints" / str(newest)) and newest < diverged[0]["step"]
