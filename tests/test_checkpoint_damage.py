"""Damage done to a checkpoint's files, one file and one kind of damage at a time, and a write that fails: the
store restores a checkpoint that matches what was saved, says so once when it has to fall back, and never
floods the log."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscale.checkpointing import CheckpointError, CheckpointStore, RunInfo
from jaxscale.checkpointing.store import DAMAGED_DIR
from jaxscale.config import CheckpointConfig

INFO = RunInfo(seed=0, mesh={"data": 8}, microbatches=1, per_device_batch=1, process_count=1, skipped_batches=[],
               data_rows=0, config={})
# Files whose loss no restore can survive: the run's metadata, Orbax's tree metadata, the OCDBT root.
ESSENTIAL = ("meta/metadata", "state/_METADATA", "state/manifest.ocdbt")


def small_state(step: int) -> dict:
    """A few arrays of the dtypes a training state has, sharded over the 8 devices, different at each step."""
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return {"step": jax.device_put(jnp.int32(step), whole),
            "w": jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 7 + step, split),
            "b": jax.device_put(jnp.linspace(-1, 1, 32, dtype=jnp.float32) * step, whole),
            "h": jax.device_put(jnp.full((16, 8), step, jnp.bfloat16) + jnp.arange(8, dtype=jnp.bfloat16), split),
            "count": jax.device_put(jnp.arange(8, dtype=jnp.int32) + step, split)}


def abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def assert_equal_states(restored: dict, expected: dict) -> None:
    for key in expected:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(expected[key]), err_msg=key)
        assert restored[key].sharding == expected[key].sharding


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints of steps 1 and 2, to copy before damaging one."""
    directory = tmp_path_factory.mktemp("saved")
    store = CheckpointStore(directory, CheckpointConfig())
    for step in (1, 2):
        store.save(step, small_state(step), INFO)
    store.wait()
    store.close()
    return directory


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    """Invert up to 16 bytes in the middle (what a failing disk or a bad copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "byte-flipped": flip, "deleted": Path.unlink}


@pytest.fixture
def noise(monkeypatch, caplog):
    """Exceptions nobody could catch (tensorstore callbacks on a closed event loop) and asyncio's errors."""
    caught = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    caplog.set_level(logging.WARNING)
    yield lambda: caught + [r for r in caplog.records if r.name == "asyncio"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_file_of_the_newest_checkpoint_damaged_in_turn(saved, tmp_path, damage, noise, caplog):
    files = sorted(str(p.relative_to(saved / "2")) for p in (saved / "2").rglob("*") if p.is_file())
    assert set(ESSENTIAL) <= set(files) and any("/d/" in f for f in files)
    fell_back = []
    for name in files:
        directory = tmp_path / name.replace("/", "_")
        shutil.copytree(saved, directory)
        DAMAGE[damage](directory / "2" / name)
        caplog.clear()
        store = CheckpointStore(directory, CheckpointConfig())
        restored = store.restore_newest(abstract(small_state(0)))
        store.close()
        warnings = [r.getMessage() for r in caplog.records if r.name == "jaxscale"]
        # Either the damage does not touch what a restore reads (a commit marker, an OCDBT node that a later
        # one superseded), and step 2 comes back exactly, or step 1 does, after one warning naming step 2.
        assert restored.metadata.step in (1, 2), name
        assert_equal_states(restored.state, small_state(restored.metadata.step))
        if restored.metadata.step == 2:
            assert warnings == [] and restored.damaged == [], name
        else:
            fell_back.append(name)
            assert len(warnings) == 1 and f"checkpoint {directory / '2'} is damaged" in warnings[0], name
            assert restored.damaged == [directory / DAMAGED_DIR / "2"] and (directory / DAMAGED_DIR / "2").is_dir()
        assert noise() == [], name
        shutil.rmtree(directory)
    assert set(ESSENTIAL) <= set(fell_back)
    assert any("/d/" in name for name in fell_back)  # the array values live in some data file


@pytest.mark.parametrize("name", ESSENTIAL)
def test_with_no_earlier_checkpoint_left_the_error_says_how_to_start_over(saved, tmp_path, name, noise):
    shutil.copytree(saved, tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "1")
    (tmp_path / "c" / "2" / name).unlink()
    store = CheckpointStore(tmp_path / "c", CheckpointConfig())
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*: all 1 were damaged .*"
                                              r"--set checkpoint\.resume=false"):
        store.restore_newest(abstract(small_state(0)))
    store.close()
    assert noise() == []


def make_read_only(directory: Path) -> bool:
    """Really read-only: by permissions for a user, by the immutable attribute for root (whom permissions do not
    stop). False where neither can be done."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0


def make_writable(directory: Path) -> None:
    if os.geteuid() != 0:
        directory.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_write_that_fails_is_a_clear_error_and_the_last_good_checkpoint_stays(tmp_path, async_save):
    store = CheckpointStore(tmp_path, CheckpointConfig(async_save=async_save))
    store.save(1, small_state(1), INFO)
    store.wait()
    if not make_read_only(tmp_path):
        store.close()
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    try:
        with pytest.raises(CheckpointError) as error:
            store.save(2, small_state(2), INFO)
            store.wait()  # an asynchronous save fails here
        store.close()
    finally:
        make_writable(tmp_path)
    message = str(error.value)
    assert message.startswith(f"writing checkpoint {tmp_path / '2'} failed: PermissionError: ")
    assert "the newest good checkpoint is still step 1" in message and f"Make {tmp_path} writable" in message
    store = CheckpointStore(tmp_path, CheckpointConfig())
    assert store.steps() == [1]
    restored = store.restore_newest(abstract(small_state(0)))
    assert restored.metadata.step == 1 and restored.damaged == []
    assert_equal_states(restored.state, small_state(1))
    store.close()
