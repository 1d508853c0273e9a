"""Which platform code runs or compiles for, and which JAX backends a process starts.

Kernel choices (Pallas on GPU, XLA elsewhere) and the compute dtype follow the devices a program is compiled
for, not `jax.default_backend()`: compiling for a TPU topology on a CPU host must pick what a TPU runs.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
# Google PCI devices that are not TPU chips (GCE's gVNIC network card and NVMe disks): a VM with only these
# has no TPU. Any other Google device might be a TPU, so JAX is then left to probe as usual.
GOOGLE_NON_TPU_DEVICES = {"0x0042", "0x001f"}


def devices_platform(devices) -> str:
    """"cpu", "gpu" or "tpu": the platform of a list or array of devices (real ones, or a topology's)."""
    first = next(iter(devices.flat)) if hasattr(devices, "flat") else next(iter(devices))
    return first.platform


def maybe_tpu_host() -> bool:
    """True unless this host certainly has no TPU chip (no /dev/accel*, no Google PCI device but NICs/disks)."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
            device = (Path(vendor).parent / "device").read_text().strip()
            if device not in GOOGLE_NON_TPU_DEVICES:
                return True
    return False


def skip_absent_tpu() -> None:
    """Keep JAX from loading libtpu (installed with the tpu extra) on a host without TPU chips.

    Unasked, JAX starts every backend it knows; on a CPU or GPU host with libtpu that prints libtpu's warnings
    about TPU_ACCELERATOR_TYPE and worker hostnames, and "Unable to initialize backend 'tpu'". Naming the
    platforms (as JAX_PLATFORMS would) skips it. A platform the user chose is left alone."""
    import jax

    if ("JAX_PLATFORMS" in os.environ or jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None
            or maybe_tpu_host()):
        return
    cuda = glob.glob("/dev/nvidia[0-9]*") and any(importlib.util.find_spec(plugin) for plugin in
                                                  ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")
