"""Training time, chip-hours, cost, energy and CO2e of a planned run, from FLOPs and catalog figures.

    training FLOPs = FLOPs/token x tokens            (FLOPs/token = 6N + 12 L d T: matmuls + attention scores)
    wall-clock     = training FLOPs / (chips x peak FLOP/s x MFU)
    chip-hours     = chips x wall-clock
    cost           = chip-hours x on-demand list price
    energy (kWh)   = chip-hours x TDP x PUE / 1000   (TDP bounds the chip's draw from above; hosts not included)
    CO2e (kg)      = energy x grid intensity (gCO2e/kWh) / 1000
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from jaxscale.cost.catalog import Accelerator

DEFAULT_MFU = 0.40  # a well-tuned dense transformer at scale reaches 0.35-0.55; used when nothing better is known
DEFAULT_PUE = 1.1  # data-centre overhead (cooling, power delivery) over the IT load; hyperscalers report ~1.1
DEFAULT_GRID_GCO2_PER_KWH = 400.0  # assumed grid carbon intensity; pass your region's figure


class EstimateError(ValueError):
    """An estimate that cannot be made with the figures at hand; the message says which one is missing."""


@dataclass(frozen=True)
class TrainingEstimate:
    hardware: str
    chips: int
    mfu: float
    tokens: float
    flops_per_token: float
    total_flops: float
    peak_flops_per_chip: float
    seconds: float
    chip_hours: float
    price_usd_per_chip_hour: float | None
    cost_usd: float | None  # None: the catalog has no price for this hardware
    tdp_watts: float | None
    pue: float
    energy_kwh: float | None  # None: the catalog has no TDP for this hardware
    grid_gco2_per_kwh: float
    co2e_kg: float | None

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


def training_flops(flops_per_token: float, tokens: float) -> float:
    """Total training FLOPs: FLOPs/token (6N + attention) times tokens trained."""
    return flops_per_token * tokens


def estimate_training(flops_per_token: float, tokens: float, accelerator: Accelerator, chips: int, mfu: float,
                      pue: float = DEFAULT_PUE, grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH
                      ) -> TrainingEstimate:
    """Time, cost, energy and emissions of training `tokens` tokens on `chips` chips at utilisation `mfu`."""
    if accelerator.peak_bf16_flops is None:
        raise EstimateError(f"hardware {accelerator.key!r} has no peak_bf16_flops in the catalog, so no time can "
                            f"be estimated for it; give one in a --catalog file")
    if chips < 1:
        raise EstimateError(f"chips must be >= 1, got {chips}")
    if not 0 < mfu <= 1:
        raise EstimateError(f"MFU must be in (0, 1], got {mfu}")
    # NaN fails every comparison, so each check is written to fail for it
    if not (0 < tokens < math.inf and 0 < flops_per_token < math.inf):
        raise EstimateError(f"tokens and FLOPs/token must be positive and finite, got {tokens} and {flops_per_token}")
    if not 1 <= pue < math.inf:
        raise EstimateError(f"PUE is total facility power over IT power, so >= 1 and finite; got {pue}")
    if not 0 <= grid_gco2_per_kwh < math.inf:
        raise EstimateError(f"grid carbon intensity must be >= 0 and finite, got {grid_gco2_per_kwh}")
    total = training_flops(flops_per_token, tokens)
    seconds = total / (chips * accelerator.peak_bf16_flops * mfu)
    chip_hours = chips * seconds / 3600.0
    price = accelerator.price_usd_per_chip_hour
    tdp = accelerator.tdp_watts
    energy_kwh = chip_hours * tdp * pue / 1000.0 if tdp is not None else None
    return TrainingEstimate(
        hardware=accelerator.key, chips=chips, mfu=mfu, tokens=tokens, flops_per_token=flops_per_token,
        total_flops=total, peak_flops_per_chip=accelerator.peak_bf16_flops, seconds=seconds,
        chip_hours=chip_hours, price_usd_per_chip_hour=price,
        cost_usd=chip_hours * price if price is not None else None, tdp_watts=tdp, pue=pue,
        energy_kwh=energy_kwh, grid_gco2_per_kwh=grid_gco2_per_kwh,
        co2e_kg=energy_kwh * grid_gco2_per_kwh / 1000.0 if energy_kwh is not None else None)


def cheapest(estimates: list[TrainingEstimate]) -> TrainingEstimate | None:
    priced = [e for e in estimates if e.cost_usd is not None]
    return min(priced, key=lambda e: e.cost_usd) if priced else None


def fastest(estimates: list[TrainingEstimate]) -> TrainingEstimate | None:
    return min(estimates, key=lambda e: e.seconds) if estimates else None
