"""The train step compiled for TPU slices on this CPU machine, by libtpu's real compiler (`jaxscale[tpu]`),
and the kernel choice following the platform compiled for. Compiles skip where libtpu is not installed."""
import importlib.util
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxscale.cli import main
from jaxscale.config import Config, load_config
from jaxscale.errors import ConfigError
from jaxscale.kernels.norm import ACTIVATION
from jaxscale.kernels.platform import kernel_platform
from jaxscale.kernels.rows import row_kernel_layout
from jaxscale.sharding import activation_rules
from jaxscale.tpu_compile import compile_for_topology, parse_topology, tpu_devices

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed: pip install 'jaxscale[tpu]'")
GPU_ONLY = re.compile(r"triton|cudnn|cublas|cuda|gpu", re.IGNORECASE)  # Pallas on Triton / Mosaic GPU, cuDNN


@pytest.mark.parametrize("name, jax_name, chips, per_host", [
    ("v5e-256", "v5e:16x16", 256, (2, 2, 1)),
    ("v5litepod-8", "v5e:2x4", 8, (2, 4, 1)),
    ("v6e-256", "v6e:16x16", 256, (2, 2, 1)),
    ("v5p-8", "v5p:2x2x1", 4, (2, 2, 1)),
    ("v5p-1024", "v5p:8x8x8", 512, (2, 2, 1)),  # v5p counts TensorCores, two per chip
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
    ("v5e:16x16", "v5e:16x16", 256, (2, 2, 1)),
])
def test_cloud_tpu_names_become_jax_topologies(name, jax_name, chips, per_host):
    topology = parse_topology(name)
    assert (topology.jax_name, topology.chips, topology.chips_per_host) == (jax_name, chips, per_host)


@pytest.mark.parametrize("name", ["v5e-100", "v7x-8", "v5p-4", "tpu", "v5e:16y16"])
def test_unknown_topologies_are_refused(name):
    with pytest.raises(ConfigError, match=f"--topology {re.escape(name)}"):
        parse_topology(name)


def rules_on(devices) -> tuple[Mesh, dict]:
    """A 4-device FSDP mesh of `devices` and the default activation rules."""
    grid = np.asarray(devices[:4]).reshape(1, 1, 4, 1)
    return Mesh(grid, ("data", "pipeline", "fsdp", "tensor")), Config().sharding.activations


def test_kernel_choice_on_cpu_meshes_is_xla():
    mesh, rules = rules_on(jax.devices())
    with activation_rules(mesh, rules):
        assert kernel_platform() == "cpu" and row_kernel_layout(ACTIVATION) is None


@needs_libtpu
def test_kernel_choice_follows_the_tpu_mesh_not_the_default_backend():
    mesh, rules = rules_on(tpu_devices(parse_topology("v5e-4"), 1))
    assert jax.default_backend() == "cpu"
    with activation_rules(mesh, rules):
        assert kernel_platform() == "tpu" and row_kernel_layout(ACTIVATION) is None  # no Pallas-on-Triton


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_kernel_choice_on_gpu_meshes_is_pallas():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "pipeline", "fsdp", "tensor"))
    with activation_rules(mesh, Config().sharding.activations):
        assert kernel_platform() == "gpu" and row_kernel_layout(ACTIVATION) is not None


# experiment, overrides, topology, slices: the mesh presets of each slice (a 2-slice mesh splits data
# across the data-center network); batch = one row per chip
SLICES = {
    "v5e-256": (["mesh=tpu-v5e-256", "train.batch_size=256"], 1),
    "2x v5e-256": (["mesh=tpu-v5e-2x256", "mesh.data=32", "mesh.fsdp=16", "train.batch_size=512"], 2),
    "v5p-1024": (["mesh=tpu-v5p-512", "train.batch_size=512"], 1),
    "v6e-256": (["mesh=tpu-v6e-256", "train.batch_size=256"], 1),
}


def compile_slice(experiment: str, key: str, *extra: str):
    overrides, slices = SLICES[key]
    config = load_config(experiment, [*overrides, *extra])
    return compile_for_topology(config, parse_topology(key.split()[-1]), slices)


def check_compiled(report, chips: int, kind: str):
    assert report.topology.chips * report.slices == chips and re.fullmatch(kind, report.device_kind)
    assert report.fits and 0 < report.bytes_per_chip < report.hbm_bytes
    assert report.xla_flops > 0 and report.model_flops > 0
    assert report.collectives.get("all-gather") and report.collectives.get("all-reduce")  # FSDP; data parallel
    assert not [c for c in report.custom_calls if GPU_ONLY.search(c)], report.custom_calls


@needs_libtpu
@pytest.mark.parametrize("key, chips, kind", [("v5e-256", 256, "TPU v5 lite"), ("2x v5e-256", 512, "TPU v5 lite"),
                                              ("v5p-1024", 512, "TPU v5p?"), ("v6e-256", 256, "TPU v6 lite")])
def test_default_experiment_compiles_for_tpu_slices(key, chips, kind):
    check_compiled(compile_slice("default", key), chips, kind)


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("key, chips, kind", [("v5e-256", 256, "TPU v5 lite"), ("2x v5e-256", 512, "TPU v5 lite"),
                                              ("v5p-1024", 512, "TPU v5p?"), ("v6e-256", 256, "TPU v6 lite")])
def test_gpt2_124m_compiles_for_tpu_slices(key, chips, kind):
    # a rolled layer loop (the experiment unrolls its 12 layers for GPUs): a minute to compile here, not three
    report = compile_slice("gpt2-124m", key, "train.scan_unroll=1")
    check_compiled(report, chips, kind)
    assert report.bytes_per_chip > 2 * 1024 * 50257 * 2  # at least one row's bf16 logits and their gradient


@needs_libtpu
def test_compile_command_prints_the_report_and_no_libtpu_warnings(capfd):
    code = main(["compile", "--topology", "v5e-256", "--set", "mesh=tpu-v5e-256", "--set", "train.batch_size=256"])
    out, err = capfd.readouterr()
    assert code == 0
    assert "compiled the train step of default for v5e-256 (256 chips, TPU v5 lite, v5e:16x16)" in out
    assert re.search(r"collectives  all-gather \d+, all-reduce \d+", out) and "fits: " in out
    assert "TPU_ACCELERATOR_TYPE" not in out + err and "TPU_WORKER_HOSTNAMES" not in out + err


@needs_libtpu
def test_a_step_too_large_for_the_chip_is_said_not_to_fit(capfd):
    code = main(["compile", "--topology", "v5e-4", "--set", "model.preset=llama-8b", "--set", "mesh.data=1",
                 "--set", "mesh.fsdp=4", "--set", "train.batch_size=4", "--set", "train.scan_unroll=1"])
    out, _ = capfd.readouterr()
    assert code == 1
    assert out.startswith("DOES NOT FIT: the TPU compiler ran out of memory for default on v5e-4")
    assert "mesh.fsdp" in out and "train.remat" in out
