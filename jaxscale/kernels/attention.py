"""Attention, one entry point for every platform: `attention(q, k, v, segment_ids)` picks the kernel.

Packed rows hold several documents; segment ids (one per token, each document one contiguous run of equal ids,
as `jaxscale.data.packing` makes them) keep attention inside each document. What runs:

| implementation | GPU | TPU | CPU |
| --- | --- | --- | --- |
| `auto` | cuDNN flash attention (bf16 / fp16); with segment ids the Triton kernel | Splash | XLA |
| `pallas` | the Triton flash kernel | Splash | the Triton kernel, interpreted (tests) |
| `cudnn` | cuDNN; with segment ids its packed layout (`cudnn_packed`), or a materialized mask where that cannot run | - | - |
| `xla` | XLA, the reference: a materialized (batch, 1, length, length) mask with segment ids | same | same |

`auto` falls back to cuDNN or XLA where a Pallas kernel cannot take the shape or the layout (see
`pallas_layout`); `pallas` raises a ConfigError naming the reason instead. The Pallas kernels are opaque to
XLA's partitioner, so under a traced mesh (`jaxscale.sharding`) each device runs them on its own rows and heads
(shard_map), laid out as the activation rules say.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxscale.errors import ConfigError
from jaxscale.kernels import cudnn_packed, flash_gpu, splash_tpu
from jaxscale.kernels.platform import kernel_platform
from jaxscale.sharding import current_activation_rules, logical_to_spec, split_count
from jaxscale.trace_notes import note, recording

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "pallas")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def traced_kernels() -> contextlib.AbstractContextManager[list[str]]:
    """Collects the name of the kernel each `attention` call traced inside this block chose: `cudnn`,
    `cudnn-packed`, `xla`, `pallas-triton` (interpreted off GPUs) or `pallas-splash`."""
    return recording("attention")


def reference(q, k, v, segment_ids, *, causal=True, sliding_window=None, scale=None, implementation="xla"):
    """jax.nn.dot_product_attention with segment ids as a materialized mask: XLA's form (the reference), or
    cuDNN's when asked for."""
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale,
                                        local_window_size=window, implementation=implementation)


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """Where a Pallas attention kernel runs: on each device's rows and heads under shard_map over `mesh`, or
    directly (mesh None: one device)."""
    mesh: Mesh | None
    q: PartitionSpec = PartitionSpec()
    kv: PartitionSpec = PartitionSpec()

    def apply(self, kernel):
        """kernel(q, k, v, segment_ids) run in this layout; segment_ids may be None."""
        if self.mesh is None:
            return kernel

        def on_device(q, k, v, *segment_ids):  # segment ids: one array, or none
            return kernel(q, k, v, *segment_ids or [None])

        def run(q, k, v, segment_ids):
            segments = () if segment_ids is None else (segment_ids,)
            specs = (self.q, self.kv, self.kv) + (PartitionSpec(self.q[0], None),) * len(segments)
            return jax.shard_map(on_device, mesh=self.mesh, in_specs=specs, out_specs=self.q,
                                 check_vma=False)(q, k, v, *segments)

        return run


def pallas_layout(q_shape, kv_shape) -> DeviceLayout | str:
    """The layout a Pallas attention kernel runs in under the traced activation rules, or why it cannot run:
    the length or the head size split over devices, or heads and KV heads split differently (each device needs
    the KV heads of its own query heads)."""
    context = current_activation_rules()
    if context is None:  # a plain call: XLA runs the kernel where the inputs are (gathered, if they are split)
        return DeviceLayout(None)
    mesh, rules = context
    q_spec, kv_spec = logical_to_spec(Q_AXES, rules, mesh), logical_to_spec(KV_AXES, rules, mesh)
    if any(spec[i] is not None for spec in (q_spec, kv_spec) for i in (1, 3)):
        return "the length or the head size is split over devices"
    if q_spec[0] != kv_spec[0] or q_spec[2] != kv_spec[2]:
        return f"queries are laid out {q_spec} but keys and values {kv_spec}"
    for shape, spec in ((q_shape, q_spec), (kv_shape, kv_spec)):
        for size, axes in zip(shape, spec):
            if size % split_count(mesh, axes):
                return f"a dimension of {size} does not split evenly over {axes}"
    return DeviceLayout(mesh if mesh.size > 1 else None, q_spec, kv_spec)


def _pallas_kernel(backend: str, length: int, head_dim: int):
    """(name, kernel(q, k, v, segment_ids, **options)) of the platform's Pallas kernel, or (None, why not)."""
    if backend == "tpu":
        reason = splash_tpu.supports(length, head_dim)
        return ("pallas-splash", splash_tpu.splash_attention) if reason is None else (None, reason)
    reason = flash_gpu.supports(length, head_dim)
    if reason is not None:
        return None, reason
    if backend != "gpu":  # the Triton kernels run interpreted off GPUs (tests)
        return "pallas-triton", functools.partial(flash_gpu.flash_attention, interpret=True)
    return "pallas-triton", flash_gpu.flash_attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              causal: bool = True, implementation: str = "auto", sliding_window: int | None = None,
              scale: float | None = None) -> jax.Array:
    """Dot-product attention: q (batch, length, heads, head_dim), k and v (batch, length, kv_heads, head_dim)
    with kv_heads dividing heads (query head h uses KV head h // (heads / kv_heads)), segment_ids (batch,
    length) int or None. sliding_window: each query sees itself and the sliding_window - 1 keys before it
    (causal), or that many on either side. scale: of the scores, 1/sqrt(head_dim) by default. Returns
    (batch, length, heads, head_dim) in q's dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} (model.attention); choose one of "
                          f"{', '.join(IMPLEMENTATIONS)}")
    if sliding_window is not None and sliding_window < 1:
        raise ConfigError(f"attention sliding_window={sliding_window} must be at least 1")
    name, kernel, layout = _choose(q.shape, k.shape, segment_ids is not None, implementation, q.dtype)
    note("attention", name)
    options = dict(causal=causal, sliding_window=sliding_window, scale=scale)
    if kernel is None:
        return reference(q, k, v, segment_ids, **options, implementation=name)
    return layout.apply(functools.partial(kernel, **options))(q, k, v, segment_ids)


def _choose(q_shape, kv_shape, segments: bool, implementation: str, dtype):
    """(name, Pallas kernel or None for cuDNN / XLA, DeviceLayout or None)."""
    backend = kernel_platform()
    half = dtype in (jnp.bfloat16, jnp.float16)  # cuDNN fails on float32
    if implementation == "cudnn" and segments and backend == "gpu" and half:
        layout = pallas_layout(q_shape, kv_shape)
        if flash_gpu.supports(q_shape[1], q_shape[3]) is None and not isinstance(layout, str):
            return "cudnn-packed", cudnn_packed.packed_attention, layout
    if implementation in ("cudnn", "xla"):
        return implementation, None, None
    cudnn = backend == "gpu" and not segments and half
    if implementation == "auto" and (backend == "cpu" or (backend == "gpu" and not segments)):
        # cuDNN's flash attention where there are no packed documents. With them, the Triton kernel: as fast as
        # cuDNN's packed layout on an H100 and no more memory than without documents (BENCHMARKS.md); on the
        # CPU it would run interpreted, so XLA.
        return ("cudnn" if cudnn else "xla"), None, None
    name, kernel = _pallas_kernel(backend, q_shape[1], q_shape[3])
    layout = pallas_layout(q_shape, kv_shape) if name is not None else kernel
    if isinstance(layout, str):
        if implementation == "pallas":
            raise ConfigError(f"model.attention=pallas: the Pallas attention kernel cannot run here ({layout}); "
                              f"set model.attention=auto to fall back to cuDNN or XLA")
        return ("cudnn" if cudnn else "xla"), None, None
    return name, kernel, layout
