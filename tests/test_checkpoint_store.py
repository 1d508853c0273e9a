"""The checkpoint store in-process, on the 8 simulated CPU devices: restores onto other meshes, damaged
checkpoints, retention, and what it refuses to do."""
import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxscale.checkpointing import CheckpointError, CheckpointStore, RunInfo
from jaxscale.checkpointing.store import DAMAGED_DIR
from jaxscale.config import CheckpointConfig, load_config
from jaxscale.training import build_trainer
from jaxscale.training.trainer import open_checkpoints

TINY = ["model.seq_len=32", "model.n_layers=1", "model.d_model=32", "train.batch_size=16",
        "train.progress=false"]


def trainer_on(devices: int, mesh: dict[str, int], *extra: str):
    settings = TINY + [f"mesh.{axis}={size}" for axis, size in mesh.items()] + list(extra)
    return build_trainer(load_config(None, settings), jax.devices()[:devices])


@pytest.fixture(scope="module")
def trainer8():
    return trainer_on(8, dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def initial_state(trainer8):
    return trainer8.init_state()


def state_at(state, step: int):
    """A distinct state per step: every parameter shifted by the step number."""
    return state.replace(step=state.step + step, params=jax.tree.map(lambda p: p + step, state.params))


def run_info(trainer) -> RunInfo:
    return RunInfo(seed=0, mesh={"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}, microbatches=1,
                   per_device_batch=4, process_count=1, skipped_batches=[], data_rows=0,
                   config=trainer.config.to_dict())


def save_steps(directory: Path, trainer, state, steps, **config) -> CheckpointStore:
    store = CheckpointStore(directory, CheckpointConfig(**config))
    for step in steps:
        store.save(step, state_at(state, step), run_info(trainer))
    store.wait()
    return store


def host(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.parametrize("devices, mesh", [(4, dict(data=1, fsdp=2, tensor=2)), (1, dict(data=1))])
def test_a_checkpoint_from_8_devices_restores_bitwise_onto_a_smaller_mesh(tmp_path, trainer8, initial_state,
                                                                        devices, mesh):
    save_steps(tmp_path, trainer8, initial_state, [3]).close()
    target = trainer_on(devices, mesh)
    store = CheckpointStore(tmp_path, CheckpointConfig())
    restored = store.restore_newest(target.abstract_state())
    store.close()
    assert restored.metadata.step == 3 and int(restored.state.step) == 3
    expected, actual = host(state_at(initial_state, 3)), host(restored.state)
    assert expected.keys() == actual.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=path)
    # Each array arrives in the target's layout: read piece by piece, never gathered first.
    for leaf, sharding in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target.shardings)):
        assert leaf.sharding == sharding


def truncate_files(directory: Path) -> None:
    for f in (p for p in directory.rglob("*") if p.is_file() and p.stat().st_size > 64):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_bytes(directory: Path) -> None:
    """Invert 16 bytes in the middle of every array data file (what a failing disk or a bad copy does)."""
    for f in (p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(f.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        f.write_bytes(bytes(data))


DAMAGE = {
    "truncated arrays": lambda step_dir: truncate_files(step_dir / "state"),
    "flipped bytes in arrays": lambda step_dir: flip_bytes(step_dir / "state"),
    "deleted metadata": lambda step_dir: (step_dir / "meta" / "metadata").unlink(),
    "garbled metadata": lambda step_dir: (step_dir / "meta" / "metadata").write_text('{"step": 2, "arr'),
}


# Damage is found before Orbax reads the arrays (checkpointing/files.py), so no "Event loop is closed" report
# comes from tensorstore's threads.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_moved_aside_with_a_warning_and_the_previous_one_used(
        tmp_path, trainer8, initial_state, damage, caplog):
    save_steps(tmp_path, trainer8, initial_state, [1, 2]).close()
    DAMAGE[damage](tmp_path / "2")
    store = CheckpointStore(tmp_path, CheckpointConfig())
    with caplog.at_level(logging.WARNING, logger="jaxscale"):
        restored = store.restore_newest(trainer8.abstract_state())
    assert restored.metadata.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state.params["embed"]),
                                  np.asarray(state_at(initial_state, 1).params["embed"]))
    assert f"checkpoint {tmp_path / '2'} is damaged" in caplog.text
    assert restored.damaged == [tmp_path / DAMAGED_DIR / "2"]
    assert (tmp_path / DAMAGED_DIR / "2" / "state").is_dir()  # kept for a post-mortem, not deleted
    assert store.steps() == [1]
    # The next save of step 2 is possible again, and retention counts only good checkpoints.
    store.save(2, state_at(initial_state, 2), run_info(trainer8))
    store.wait()
    assert store.steps() == [1, 2]
    store.close()


def test_when_every_checkpoint_is_damaged_the_error_says_how_to_start_over(tmp_path, trainer8, initial_state):
    save_steps(tmp_path, trainer8, initial_state, [1]).close()
    truncate_files(tmp_path / "1" / "state")
    store = CheckpointStore(tmp_path, CheckpointConfig())
    with pytest.raises(CheckpointError, match="no usable checkpoint.*checkpoint.resume=false"):
        store.restore_newest(trainer8.abstract_state())
    store.close()
    assert (tmp_path / DAMAGED_DIR / "1").is_dir()


def test_a_checkpoint_of_another_model_is_an_error_and_is_left_in_place(tmp_path, trainer8, initial_state):
    save_steps(tmp_path, trainer8, initial_state, [1]).close()
    wider = trainer_on(8, dict(data=2, fsdp=2, tensor=2), "model.d_model=64")
    store = CheckpointStore(tmp_path, CheckpointConfig())
    with pytest.raises(CheckpointError, match=r"different model or optimizer configuration:\n  \.params"):
        store.restore_newest(wider.abstract_state())
    assert store.steps() == [1] and not (tmp_path / DAMAGED_DIR).exists()
    store.close()


def test_retention_keeps_the_last_k_and_every_pth_step(tmp_path, trainer8, initial_state):
    store = save_steps(tmp_path, trainer8, initial_state, range(1, 10), keep_last=2, keep_every=4)
    assert store.steps() == [4, 8, 9]
    store.close()


def test_a_non_finite_state_is_never_saved(tmp_path, trainer8, initial_state):
    store = save_steps(tmp_path, trainer8, initial_state, [1])
    poisoned = initial_state.replace(params={**initial_state.params,
                                             "embed": initial_state.params["embed"] * np.float32("nan")})
    with pytest.raises(CheckpointError, match="refusing to save step 2.*NaN or Inf.*step 1"):
        store.save(2, poisoned, run_info(trainer8))
    store.wait()
    assert store.steps() == [1]
    store.close()


def test_starting_over_refuses_to_delete_a_runs_checkpoints_unless_told(tmp_path, trainer8, initial_state):
    run_dir = tmp_path / "run"
    save_steps(run_dir / "checkpoints", trainer8, initial_state, [5, 10]).close()
    config = load_config(None, TINY + [f"run_dir={run_dir}", "checkpoint.resume=false"])
    with pytest.raises(CheckpointError, match=r"already holds the checkpoints of a run \(steps 5, 10\).*"
                                              r"--set checkpoint.overwrite=true"):
        open_checkpoints(config)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
    overwrite = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, overwrite=True))
    store = open_checkpoints(overwrite)
    assert store.steps() == []
    store.close()
    shutil.rmtree(run_dir)


@pytest.mark.parametrize("where", ["file", "file/checkpoints"])
def test_a_checkpoint_dir_that_is_a_file_is_refused_when_opened_not_at_the_first_save(tmp_path, where):
    (tmp_path / "file").write_text("not a directory")
    message = (rf"cannot keep checkpoints in {re.escape(str(tmp_path / where))}: "
               rf"{re.escape(str(tmp_path / 'file'))} is a file, not a directory; "
               r"set checkpoint\.dir \(or run_dir\) to a directory")
    with pytest.raises(CheckpointError, match=message):
        CheckpointStore(tmp_path / where, CheckpointConfig())
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_when_opened(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    real_access = os.access
    # chmod cannot lock out root (tests may run as root): the check is made to see a read-only directory
    monkeypatch.setattr(os, "access",
                        lambda path, mode: path != tmp_path / "locked" and real_access(path, mode))
    message = rf"{re.escape(str(tmp_path / 'locked'))} is not writable by this user; set checkpoint\.dir"
    with pytest.raises(CheckpointError, match=message):
        CheckpointStore(tmp_path / "locked" / "checkpoints", CheckpointConfig())
    assert not (tmp_path / "locked" / "checkpoints").exists()


def test_opening_a_run_whose_checkpoint_dir_is_a_file_names_the_setting(tmp_path):
    (tmp_path / "ckpt").write_text("")
    config = load_config(None, TINY + ["train.steps=1", f"run_dir={tmp_path / 'run'}",
                                       f"checkpoint.dir={tmp_path / 'ckpt'}"])
    with pytest.raises(CheckpointError, match=r"is a file, not a directory; set checkpoint\.dir"):
        open_checkpoints(config)
