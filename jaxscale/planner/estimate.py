"""Analytic memory per device and a roofline step time for one layout of the built-in decoder.

Memory, bytes per device:
- state: parameters, gradients and the two Adam moments, each in the parameter dtype, split over the devices
  that split the parameters (fsdp x tensor x pipeline); a second gradient buffer while accumulating
  microbatches. With the optimizer state offloaded the moments live in host memory; with the master
  parameters offloaded too, the device holds their compute-dtype copy instead. Of what lives on the host, only
  the largest parameter's share is on the device at once, moved in for its update.
- activations kept for the backward pass, per layer and token of one microbatch (values in the compute dtype):
  none keeps what `jaxscale.cost.memory` counts (Korthikanti et al. 2022, fused attention), plus the score and
  probability matrices where attention is not fused (XLA's, on a CPU); full keeps each layer's input; save:NAMES
  the input and the named values; offload:NAMES the input on the device and the named values on the host. Under
  remat, one layer's working set (none's figure) is added once, for its recomputation. Plus the float32 logits.

Step time: compute + collectives + host transfers, less the part of the collectives hidden behind compute:
overlap x min(compute, collectives), where overlap is the fraction the catalog's `collective_overlap` gives
for the chip (measured), else 0: no overlap assumed (an upper bound when XLA overlaps). At 1 the step takes
max(compute, collectives) + host transfers. Host transfers are not overlapped: the offloaded state moves after
the backward pass (`jaxscale.training.step.apply_update`).
- compute: the model's FLOPs (6N + 12LdT per token) plus the forward work remat recomputes, at the chip's peak
  times the MFU jaxscale measured on it (the catalog's `measured_mfu`), stretched by the pipeline bubble.
- collectives, over one direction of the chip's interconnect (the catalog's figure is both directions): the
  data-parallel all-reduce of float32 gradients, FSDP's weight gathers (forward and backward, compute dtype) and
  gradient reduce-scatter per microbatch, and tensor parallelism's four activation all-reduces per layer.
- host transfers over the device-host link: the Adam moments in and out each step; offloaded master
  parameters in (for the compute copy, cast on the device), in again for the update and out; offloaded
  activations out and back each microbatch.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxscale.config import Config
from jaxscale.errors import ConfigError
from jaxscale.model.config import ModelConfig
from jaxscale.planner.candidates import Candidate
from jaxscale.remat import parse_remat


@dataclass(frozen=True)
class Rates:
    """What a device does per second, and how much memory it has."""

    kind: str  # the catalog key, e.g. h200
    flops_per_s: float  # peak x efficiency
    efficiency_note: str  # where the efficiency comes from
    link_bytes_per_s: float | None  # one direction between devices; None: unknown
    host_bytes_per_s: float | None  # device <-> host, one direction; None: no host offload planned
    memory_bytes: float | None  # per device; None: no limit known (a CPU)
    compute_bytes: int  # 2 for bf16, 4 for float32 compute
    fused_attention: bool  # attention keeps no length x length matrices (flash / cuDNN / Splash)
    collective_overlap: float = 0.0  # the fraction of collective time hidden behind compute


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    device_bytes: float
    host_bytes: float
    compute_s: float
    collective_s: float
    host_s: float
    tokens_per_step: int
    collective_overlap: float = 0.0  # Rates.collective_overlap

    @property
    def step_s(self) -> float:
        hidden = self.collective_overlap * min(self.compute_s, self.collective_s)
        return self.compute_s + self.collective_s - hidden + self.host_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def layer_forward_flops(m: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of one layer, by part (attention as in the 12LdT term: 4 T d forward)."""
    hd = m.head_dim
    return {"qkv": 2 * m.d_model * (m.n_heads + 2 * m.n_kv_heads) * hd,
            "attention": 4 * m.seq_len * m.n_heads * hd,
            "out_projection": 2 * m.n_heads * hd * m.d_model,
            "mlp_in": 2 * m.d_model * m.d_ff * (2 if m.style == "llama" else 1),
            "mlp_out": 2 * m.d_ff * m.d_model}


def recomputed_fraction(m: ModelConfig, remat: str) -> float:
    """Forward FLOPs of the layers that the backward pass runs again, as a fraction of their forward FLOPs.
    full: all. save/offload: all but the saved q/k/v projection and the MLP output projection (whose output
    the backward needs nowhere; attention runs again for its softmax statistics, the MLP input for its
    activation's)."""
    mode, names = parse_remat(remat)
    parts = layer_forward_flops(m)
    total = sum(parts.values())
    if mode == "full":
        return 1.0
    if mode in ("save", "offload"):
        kept = parts["mlp_out"] + (parts["qkv"] if "qkv" in names else 0)
        return (total - kept) / total
    return 0.0


def saved_values_per_token(m: ModelConfig, names: tuple[str, ...], tensor: int) -> float:
    """Values per token and layer the named save points hold on one device."""
    sizes = {"qkv": (m.n_heads + 2 * m.n_kv_heads) * m.head_dim / tensor,
             "attention_out": m.n_heads * m.head_dim / tensor,
             "mlp_hidden": m.d_ff / tensor}
    return sum(sizes[n] for n in names)


def estimate(config: Config, c: Candidate, rates: Rates) -> Estimate:
    m, t = config.model, config.train
    n = c.data * c.fsdp * c.tensor * c.pipeline
    params = m.total_params()
    param_bytes = 2 if t.param_dtype in ("bfloat16", "float16") else 4
    shards = c.fsdp * c.tensor * c.pipeline
    per_device_params = params / shards
    cb = rates.compute_bytes
    # gradients, the parameters (or their compute copy), the moments unless offloaded
    resident = param_bytes + (cb if c.offload_params else param_bytes) + (0 if c.offload_optimizer else 2 * param_bytes)
    state = per_device_params * resident
    streamed = param_bytes * (2 * c.offload_optimizer + c.offload_params)  # per parameter, in for its update
    host = streamed * per_device_params
    if streamed:
        largest = max(m.padded_vocab * m.d_model, m.n_layers * m.d_model * max(m.d_ff, m.n_heads * m.head_dim))
        state += streamed * largest / shards
    if c.microbatches > 1:
        state += per_device_params * param_bytes

    sequences = t.batch_size / (c.data * c.fsdp * c.microbatches)
    tokens = sequences * m.seq_len  # of one microbatch, on one device
    layers = m.n_layers / c.pipeline
    working = tokens * m.d_model * (10 + 24 / c.tensor) * cb / 2  # one layer, everything kept
    if not rates.fused_attention:
        working += 2 * tokens * m.seq_len * m.n_heads / c.tensor * cb
    mode, names = parse_remat(c.remat)
    layer_input = tokens * m.d_model * cb
    if mode in ("none", "dots"):
        activations = working * layers
    elif mode == "full":
        activations = layer_input * layers + working
    else:
        saved = tokens * saved_values_per_token(m, names, c.tensor) * cb * layers
        activations = layer_input * layers + working + (saved if mode == "save" else 0)
        if mode == "offload":
            host += saved
    activations += 4 * tokens * m.padded_vocab / c.tensor  # float32 logits
    # one layer's weights gathered by FSDP in the compute dtype, and the next one prefetched
    gathered = 2 * params / m.n_layers / c.tensor * cb if c.fsdp > 1 else 0.0

    step_tokens = t.batch_size * m.seq_len
    flops = m.flops_per_token() * step_tokens / n
    flops += m.n_layers * sum(layer_forward_flops(m).values()) * recomputed_fraction(m, c.remat) * step_tokens / n
    bubble = (c.pipeline - 1) / (c.pipeline_microbatches + c.pipeline - 1) if c.pipeline > 1 else 0.0
    compute_s = flops / rates.flops_per_s / (1 - bubble)

    comm = 0.0
    weights = params / (c.tensor * c.pipeline)  # what one FSDP group gathers
    if c.fsdp > 1:
        ring = (c.fsdp - 1) / c.fsdp
        comm += c.microbatches * ring * weights * (2 * cb + 4)
    if c.data > 1:
        comm += 2 * (c.data - 1) / c.data * per_device_params * 4
    if c.tensor > 1:
        comm += c.microbatches * 4 * 2 * (c.tensor - 1) / c.tensor * tokens * m.d_model * cb * layers
    if comm and rates.link_bytes_per_s is None:
        raise ConfigError(f"--device-kind {rates.kind}: the hardware catalog has no interconnect_bytes_per_s for "
                          f"it, which layouts over several devices are timed by; add it with --catalog FILE")
    collective_s = comm / rates.link_bytes_per_s if comm else 0.0

    moved = (2 * streamed + param_bytes * c.offload_params) * per_device_params
    if mode == "offload":
        moved += 2 * c.microbatches * tokens * saved_values_per_token(m, names, c.tensor) * cb * layers
    host_s = moved / rates.host_bytes_per_s if moved else 0.0
    return Estimate(c, state + activations + gathered, host, compute_s, collective_s, host_s, step_tokens,
                    rates.collective_overlap)
