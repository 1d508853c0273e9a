"""Measured energy: the NVML meter, and the end-of-training summary against a hand calculation."""
import time

import pytest

from jaxscale.cost.catalog import Accelerator, load_catalog
from jaxscale.cost.energy import EnergyMeter, run_summary

GPU = Accelerator(key="gpu", name="A GPU", device_kinds=("gpu",), peak_bf16_flops=1e15, hbm_bytes=80e9,
                  hbm_bytes_per_s=None, interconnect_bytes_per_s=None, tdp_watts=700.0,
                  price_usd_per_chip_hour=3.0, price_date="2026-01", sources={})


def test_energy_meter_reads_none_without_nvidia_gpus():
    meter = EnergyMeter()  # this machine has no NVIDIA GPU (with or without nvidia-ml-py installed)
    assert meter.available is False
    assert meter.read() is None
    assert meter.read() is None  # and keeps saying so, without raising
    meter.close()
    assert meter.read() is None


def test_run_summary_totals_by_hand():
    rows = [
        {"step": 10, "loss": 4.0, "tokens": 40_960, "elapsed_s": 10.0, "energy_j": None},  # first read: no delta
        {"step": 20, "loss": 3.5, "tokens": 81_920, "elapsed_s": 20.0, "energy_j": 7_000.0},
        {"step": 20, "eval_loss": 3.6},  # evaluation rows carry no counters
        {"step": 30, "loss": 3.2, "tokens": 122_880, "elapsed_s": 36.0, "energy_j": 11_000.0},
    ]
    summary = run_summary(rows, GPU, chips=2)
    # 18,000 J over 122,880 tokens and 36 s; 2 chips x 36 s = 0.02 chip-hours at $3: $0.06.
    assert summary["tokens"] == 122_880 and summary["wall_s"] == 36.0
    assert summary["energy_j"] == pytest.approx(18_000)
    assert summary["energy_kwh"] == pytest.approx(18_000 / 3.6e6)
    assert summary["j_per_token"] == pytest.approx(18_000 / 122_880)
    assert summary["avg_power_w"] == pytest.approx(500)
    assert summary["chip_hours"] == pytest.approx(0.02)
    assert summary["cost_usd"] == pytest.approx(0.06)
    assert summary["tdp_bound_kwh"] == pytest.approx(0.02 * 700 / 1000)  # measured must stay below it
    assert summary["energy_kwh"] < summary["tdp_bound_kwh"]


def test_run_summary_on_cpu_has_no_energy_or_cost():
    rows = [{"step": 10, "loss": 4.0, "tokens": 2048, "elapsed_s": 3.0, "energy_j": None}]
    summary = run_summary(rows, load_catalog()["cpu"])
    assert summary["tokens"] == 2048 and summary["chip_hours"] == pytest.approx(3 / 3600)
    for key in ("energy_j", "energy_kwh", "j_per_token", "avg_power_w", "cost_usd", "tdp_bound_kwh"):
        assert summary[key] is None, key
    assert run_summary([], None)["tokens"] is None


@pytest.mark.skipif(not EnergyMeter().available, reason="needs an NVIDIA GPU with NVML and nvidia-ml-py")
def test_energy_meter_on_a_gpu_reads_plausible_idle_energy():
    meter = EnergyMeter()
    started = time.perf_counter()
    time.sleep(1.0)
    joules = meter.read()
    watts = joules / (time.perf_counter() - started)
    assert 0 < watts < 1500 * 8  # at least some draw; at most eight boards at full power
    meter.close()
