"""The profile summary, on a trace laid out by hand (a CPU's trace holds no device kernels to check it on; the
bench test covers the real CPU trace) and on a CPU trace whose steps ran on the Python thread."""
import gzip
import json

import pytest

from jaxscale.trace_summary import format_summary, kernel_kind, summarize

STEP = [  # (start µs, duration µs, stream, name) of one step; the next step starts 2500 µs later
    (0, 1000, 1, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT"),
    (1000, 500, 1, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16"),
    (1600, 200, 1, "loop_add_fusion"),  # 100 µs with no kernel before it
    (1700, 400, 2, "ncclDevKernel_AllGather_RING_LL"),  # beside loop_add_fusion for 100 µs, alone for 300
]


def write_events(directory, events):
    path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))


def write_trace(directory, steps=2):
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 9000, "name": "host work, not a kernel"}]
    events += [{"ph": "X", "pid": 7, "tid": tid, "ts": start + 2500 * step, "dur": dur, "name": name}
               for step in range(steps) for start, dur, tid, name in STEP]
    write_events(directory, events)


def test_device_time_per_step_by_hand(tmp_path):
    write_trace(tmp_path)
    [gpu] = summarize(tmp_path, steps=2)
    assert gpu.device == "/device:GPU:0"
    assert gpu.kernel_ms == pytest.approx(2.1)  # 1000 + 500 + 200 + 400 µs
    assert gpu.busy_ms == pytest.approx(2.0)  # [0, 1500) and [1600, 2100)
    assert gpu.span_ms == pytest.approx(2.3)  # 0 to 4600 µs over two steps
    assert gpu.idle_ms == pytest.approx(0.3)  # each step's 100 µs gap and the 400 µs between them
    assert gpu.exposed_collective_ms == pytest.approx(0.3)
    assert gpu.by_kind == pytest.approx({"matmul": 1.0, "attention": 0.5, "collective": 0.4, "other": 0.2})
    assert gpu.top[0] == ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", pytest.approx(1.0), 1)
    assert "idle 0.30" in format_summary([gpu])


def test_kernel_kinds():
    assert kernel_kind("gemm_fusion_dot_265") == "matmul"  # XLA's Triton matmuls
    assert kernel_kind("void cublasLt::splitKreduce_kernel<32, 16>") == "matmul"
    assert kernel_kind("void cudnn::fusion::convert_dq_to_16bits<true>") == "attention"
    assert kernel_kind("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL") == "collective"
    assert kernel_kind("input_add_reduce_fusion_23") == "other"


def test_a_directory_without_a_trace_says_how_to_write_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench --profile"):
        summarize(tmp_path, steps=1)


def test_a_cpu_trace_beside_an_empty_device_process_summarizes_the_host_ops(tmp_path):
    """With libtpu loaded (a TPU compile earlier in the process), a CPU trace also names a device process of
    libtpu's own ("/device:CUSTOM:Megascale Trace"); the XLA ops on the host threads are still what ran."""
    op = {"ph": "X", "pid": 1, "tid": 5, "dur": 300, "name": "ynn_fusion", "args": {"hlo_op": "ynn_fusion"}}
    events = [{"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/device:CUSTOM:Megascale Trace"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {**op, "ts": 0}, {**op, "ts": 1000}, {**op, "pid": 9, "ts": 2000},
              {"ph": "X", "pid": 1, "tid": 5, "ts": 400, "dur": 100, "name": "ThunkExecutor::Execute"}]
    write_events(tmp_path, events)
    [cpu] = summarize(tmp_path, steps=2)
    assert cpu.device == "/host:CPU" and cpu.kernel_ms == pytest.approx(0.3)
    assert cpu.top == [("ynn_fusion", pytest.approx(0.3), 1)]


INLINE_STEPS = """
import sys
import jax
import jax.numpy as jnp
jax.config.update("jax_cpu_enable_async_dispatch", False)  # the client runs each step on the calling thread
from jaxscale.trace_summary import summarize
step = jax.jit(lambda x: jnp.tanh(x @ x))
x = step(jnp.ones((64, 64)))
jax.profiler.start_trace(sys.argv[1], create_perfetto_trace=True)
for _ in range(3):
    x = step(x)
jax.block_until_ready(x)
jax.profiler.stop_trace()
[cpu] = summarize(sys.argv[1], steps=3)
print(cpu.device, sorted(name for name, _, calls in cpu.top if calls == 1))
"""


def test_a_cpu_step_run_on_the_python_thread_is_summarized(tmp_path):
    """A step the client runs inline (async dispatch off) has its ops on the thread that dispatched it, not on a
    client thread: they count."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", INLINE_STEPS, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("/host:CPU [")
    assert "fusion" in done.stdout.splitlines()[-1]
