"""Attention over packed documents (`jaxscale.kernels`): every kernel gives the XLA reference's output and
gradients (q, k, v), and the dispatch picks, records and lays out the kernels as documented.

On the CPU the Pallas (Triton) flash kernels run through Pallas's interpreter, with tiles small enough that a
row spans several blocks, so block skipping and the masked/unmasked split are exercised; Splash runs the same
way, and both kernels are lowered for their own platform (CUDA, TPU). The `gpu` tests compile the Triton
kernels natively (skipped off GPUs). Rows of one batch hold different
layouts: one document, many short ones, documents cut by the row's ends (a row of packed text starts and ends
inside documents), and a padding tail of segment id 0.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import batches, make_config
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import Mesh, PartitionSpec

from jaxscale.data.packing import segment_ids as packed_segment_ids
from jaxscale.errors import ConfigError
from jaxscale.kernels import attention, traced_kernels
from jaxscale.kernels.attention import pallas_layout, reference
from jaxscale.kernels.cudnn_packed import document_bounds, max_documents
from jaxscale.kernels.flash_gpu import Tiles, flash_attention, token_bounds
from jaxscale.kernels.splash_tpu import splash_attention
from jaxscale.model import Model, ModelConfig
from jaxscale.model.transformer import layer
from jaxscale.remat import POLICIES
from jaxscale.sharding import activation_rules
from jaxscale.training import build_trainer
from jaxscale.training.step import tracing_model

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernels: GPU only")
SMALL_TILES = Tiles(forward=(16, 16), dkv=(16, 32), dq=(32, 16))  # several blocks per row at length 64


def layouts(length: int, seed: int = 0) -> np.ndarray:
    """(4, length) segment ids: one document; many short ones; a stream cut into a row (its first and last
    documents continue in the rows before and after); a document then padding (id 0) to the end."""
    rng = np.random.default_rng(seed)
    eos = 0
    many = rng.integers(1, 100, (1, length)) * (rng.random((1, length)) > 0.15)
    stream = np.where(rng.random(3 * length) < 4 / length, eos, 1)  # a few long documents
    cut = stream[None, length:2 * length]
    padded = np.concatenate([np.ones(length - length // 3, np.int32), np.zeros(length // 3, np.int32)])
    return np.concatenate([np.ones((1, length), np.int32), packed_segment_ids(many, eos),
                           packed_segment_ids(cut, eos), padded[None]]).astype(np.int32)


def qkv(batch, length, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


def value_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(d_out))


def assert_matches(got, want, rel):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=rel * float(np.abs(b).max()), err_msg=name)


def test_layouts_are_what_they_say():
    ids = layouts(64)
    assert (ids[0] == 1).all() and ids[1].max() > 5 and ids[2][0] == 1 and ids[3][-1] == 0
    assert (np.diff(ids[:3], axis=1) >= 0).all()  # each document one contiguous run


def test_cudnn_document_bounds_are_each_rows_documents():
    segments = layouts(1024)
    cap = max_documents(1024)
    offsets, lengths, count = map(np.asarray, jax.jit(document_bounds, static_argnums=1)(segments, cap))
    for row, off, size, n in zip(segments, offsets, lengths, count):
        starts = np.flatnonzero(np.diff(row, prepend=row[0] - 1))
        assert n == len(starts)
        kept = min(n, cap)
        np.testing.assert_array_equal(off[:kept], starts[:kept])
        np.testing.assert_array_equal(size[:kept], np.diff(np.append(starts, 1024))[:kept])
        if n <= cap:  # a row of more takes the Triton kernel
            assert (off[kept:] == -1).all() and (size[kept:] == -1).all()
    assert count.max() > cap >= count.min()  # both of packed_attention's branches are exercised by layouts


def test_token_bounds_follow_documents_causality_and_window():
    ids = jnp.asarray([[1, 1, 2, 2, 2, 0, 0, 0]])
    key_lo, key_hi, query_lo, query_hi = token_bounds(ids, 1, 8, causal=True, sliding_window=2)
    assert key_lo.tolist() == [[0, 0, 2, 2, 3, 5, 5, 6]] and key_hi.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert query_lo.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]] and query_hi.tolist() == [[2, 2, 4, 5, 5, 7, 8, 8]]
    key_lo, key_hi, _, _ = token_bounds(None, 1, 8, causal=False, sliding_window=None)
    assert key_lo.tolist() == [[0] * 8] and key_hi.tolist() == [[8] * 8]


# name: heads, kv heads, causal, sliding window
CASES = {
    "gqa": (4, 2, True, None),
    "mqa": (4, 1, True, None),
    "mha-sliding-window": (2, 2, True, 12),
    "gqa-bidirectional": (4, 2, False, None),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_match_the_reference(case):
    heads, kv_heads, causal, window = CASES[case]
    segments = jnp.asarray(layouts(64))
    q, k, v, d_out = qkv(4, 64, heads, kv_heads, 16)
    kernel = functools.partial(flash_attention, segment_ids=segments, causal=causal, sliding_window=window,
                               tiles=SMALL_TILES, interpret=True)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, segments, causal=causal, sliding_window=window),
                           q, k, v, d_out)
    assert_matches(value_and_grads(lambda q, k, v: kernel(q, k, v), q, k, v, d_out), want, 1e-5)


def mesh(**sizes):
    shape = tuple(sizes.get(axis, 1) for axis in ("data", "fsdp", "tensor", "pipeline"))
    devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, ("data", "fsdp", "tensor", "pipeline"))


RULES = {"batch": ["data", "fsdp"], "length": None, "heads": "tensor", "kv_heads": "tensor", "head_dim": None}


def test_splash_matches_the_reference_on_each_devices_rows_and_heads():
    """Splash through Pallas's interpreter, in the layout the dispatch gives it on a mesh that splits the batch
    and the heads (shard_map, each device a vmap over its rows)."""
    segments = jnp.asarray(layouts(256))
    q, k, v, d_out = qkv(4, 256, 4, 2, 128)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, segments), q, k, v, d_out)
    with activation_rules(mesh(data=2, tensor=2), RULES):
        layout = pallas_layout(q.shape, k.shape)
        splash = layout.apply(functools.partial(splash_attention, interpret=True))
        got = jax.jit(lambda *a: value_and_grads(lambda q, k, v: splash(q, k, v, segments), *a))(q, k, v, d_out)
    assert layout.mesh is not None
    assert_matches(got, want, 1e-5)


def test_dispatch_picks_xla_on_the_cpu_and_the_kernel_when_asked():
    segments = jnp.asarray(layouts(32))
    q, k, v, _ = qkv(4, 32, 4, 2, 16)
    with traced_kernels() as names:
        auto = attention(q, k, v, segments)
        pallas = attention(q, k, v, segments, implementation="pallas")
    assert names == ["xla", "pallas-triton"]
    np.testing.assert_allclose(pallas, auto, atol=1e-5)
    with pytest.raises(ConfigError, match="head size 12"):
        attention(q[..., :12], k[..., :12], v[..., :12], segments, implementation="pallas")
    with pytest.raises(ConfigError, match="implementation 'flash'"):
        attention(q, k, v, segments, implementation="flash")


def test_kernel_layout_follows_the_activation_rules():
    q_shape, kv_shape = (8, 64, 4, 16), (8, 64, 2, 16)
    with activation_rules(mesh(data=2, fsdp=2, tensor=2), RULES):
        layout = pallas_layout(q_shape, kv_shape)
        assert layout.q == PartitionSpec(("data", "fsdp"), None, "tensor", None) and layout.kv == layout.q
    with activation_rules(mesh(tensor=4), RULES):  # 2 KV heads cannot split 4 ways
        assert "does not split evenly" in pallas_layout(q_shape, kv_shape)
    with activation_rules(mesh(tensor=2), {**RULES, "kv_heads": None}):
        assert "laid out" in pallas_layout(q_shape, kv_shape)
    with activation_rules(mesh(data=2, fsdp=2), {**RULES, "batch": "data", "length": "fsdp"}):
        assert "length" in pallas_layout(q_shape, kv_shape)


def test_sharded_kernel_matches_the_reference_and_auto_falls_back_where_it_cannot_run():
    segments = jnp.asarray(np.tile(layouts(32), (2, 1)))
    q, k, v, d_out = qkv(8, 32, 4, 2, 16)
    want = value_and_grads(lambda q, k, v: reference(q, k, v, segments), q, k, v, d_out)
    with activation_rules(mesh(data=2, fsdp=2, tensor=2), RULES), traced_kernels() as names:
        got = jax.jit(lambda *a: value_and_grads(lambda q, k, v: attention(q, k, v, segments,
                                                                           implementation="pallas"), *a))(
            q, k, v, d_out)
    assert_matches(got, want, 1e-5)
    assert set(names) == {"pallas-triton"}
    with activation_rules(mesh(tensor=4), RULES), traced_kernels() as names:
        jax.eval_shape(lambda q, k, v: attention(q, k, v, segments), q, k, v)
    assert names == ["xla"]


def test_dots_remat_keeps_the_kernel_output_and_log_sum_exp(capsys):
    cfg = ModelConfig.from_preset("tiny-llama", attention="pallas")
    weights = jax.tree.map(lambda a: a[0], Model.build(cfg).init(jax.random.key(0))["blocks"])
    x, positions = jnp.ones((2, 32, cfg.d_model)), jnp.broadcast_to(jnp.arange(32), (2, 32))
    segments = jnp.asarray(layouts(32)[:2])

    def loss(x, weights):
        return layer(cfg, weights, x, positions, segments, jnp.float32).sum()

    capsys.readouterr()
    print_saved_residuals(jax.checkpoint(loss, policy=POLICIES["dots"]), x, weights)
    saved = [line for line in capsys.readouterr().out.splitlines() if "attention_residuals" in line]
    assert len(saved) == 2 and "f32[2,32,4,16]" in saved[0] and "f32[2,4,32]" in saved[1], saved


@on_gpu
def test_gpu_dots_remat_compiles_one_forward_kernel_per_layer():
    """Saving the kernel's outputs is only worth it if the compiled backward does not run the forward kernel
    again: JAX keeps the recomputed pallas_call in the backward's jaxpr (its DCE rule never drops one), so this
    checks that XLA removed it."""
    cfg = ModelConfig.from_preset("tiny-llama", attention="pallas")
    weights = jax.tree.map(lambda a: a[0], Model.build(cfg).init(jax.random.key(0))["blocks"])
    x, positions = jnp.ones((2, 64, cfg.d_model)), jnp.broadcast_to(jnp.arange(64), (2, 64))
    segments = jnp.asarray(layouts(64)[:2])

    def loss(x, weights):
        return layer(cfg, weights, x, positions, segments, jnp.bfloat16).astype(jnp.float32).sum()

    for policy, forwards in (("dots", 1), ("full", 2)):  # the loss is returned, so the first forward is live
        step = jax.jit(jax.value_and_grad(jax.checkpoint(loss, policy=POLICIES[policy]), argnums=(0, 1)))
        hlo = step.lower(x, weights).compile().as_text()
        calls = [line for line in hlo.splitlines() if "custom-call(" in line and "flash_attention_forward" in line]
        assert len(calls) == forwards, (policy, calls)


def loss_and_grads(config, devices):
    """The first step's loss and gradients, under the trainer's mesh and activation rules."""
    trainer = build_trainer(config, devices)
    params = trainer.init_state().params
    batch = jax.device_put(batches(config)[0], trainer.data_sharding)
    def step(params, batch):
        with tracing_model(config, trainer.mesh, trainer.plan.per_device_batch):
            return jax.value_and_grad(lambda p: trainer.model.loss(p, batch, jax.random.key(0))[0])(params)

    with traced_kernels() as names:
        result = jax.device_get(jax.jit(step)(params, batch))
    return result, set(names)


@pytest.mark.slow  # 20-35 s each on 2 CPU cores
@pytest.mark.parametrize("layout", [dict(data=2, fsdp=2, tensor=2), dict(data=2, tensor=2, pipeline=2)],
                         ids=["data2-fsdp2-tensor2", "data2-tensor2-pipeline2"])
def test_model_gradients_with_the_kernel_match_xla(layout):
    """The llama model's loss and gradients with the kernel (GQA, rope, scanned or pipelined layers) on a
    mesh that splits batch and heads equal XLA's. (Compared before AdamW, which amplifies float noise where a
    gradient is near zero.)"""
    config = make_config("llama", layout)
    if "pipeline" in layout:
        from jaxscale.parallel import PipelineConfig
        config.pipeline = PipelineConfig(microbatches=4)
    devices = jax.devices()[:int(np.prod(list(layout.values())))]
    (want_loss, want), want_names = loss_and_grads(config, devices)
    config.model = dataclasses.replace(config.model, attention="pallas")
    (loss, grads), names = loss_and_grads(config, devices)
    assert want_names == {"xla"} and names == {"pallas-triton"}
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * float(np.abs(b).max()) + 1e-9),
                 grads, want)


def temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@functools.cache
def attention_grad_memory(length, implementation):
    q, k, v, _ = qkv(1, length, 2, 1, 16)
    segments = jnp.ones((1, length), jnp.int32)

    def loss(q, k, v):
        return attention(q, k, v, segments, implementation=implementation).sum()

    return temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)


def test_kernel_memory_grows_linearly_in_length():
    """Compiled temporary memory of the gradient of one attention call with segment ids (the Triton kernels
    compiled for the CPU through Pallas's interpreter) at lengths 1k, 2k and 4k: it at most doubles with each
    doubling (measured: 6.0, 11.6, 22.6 MB)."""
    kernel = [attention_grad_memory(n, "pallas") for n in (1024, 2048, 4096)]
    assert kernel[1] <= 2.1 * kernel[0] and kernel[2] <= 2.1 * kernel[1], kernel


def test_reference_memory_grows_quadratically_in_length():
    """The same for XLA's form, with its (length x length) mask and scores: 3.5-fold or more from 2k to 4k
    (measured: 100.7 -> 402.7 MB), and ten times the kernel's at 4k."""
    xla = [attention_grad_memory(n, "xla") for n in (2048, 4096)]
    assert xla[1] >= 3.5 * xla[0], xla
    assert attention_grad_memory(4096, "pallas") * 10 < xla[1], xla


def lowered_value_and_grads(kernel, length: int, head_dim: int, window: int, platform: str) -> str:
    """The HLO text of `kernel`'s value and q/k/v gradients (batch 2, 8 query and 2 KV heads, bf16, segment ids,
    a sliding window) lowered for `platform`, on any machine."""
    q = jax.ShapeDtypeStruct((2, length, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, length, 2, head_dim), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((2, length), jnp.int32)

    def step(q, k, v, segment_ids, d_out):
        return value_and_grads(lambda q, k, v: kernel(q, k, v, segment_ids, sliding_window=window), q, k, v, d_out)

    return jax.jit(step).trace(q, kv, kv, segments, q).lower(lowering_platforms=(platform,)).as_text()


def test_triton_kernels_lower_for_cuda_on_any_machine():
    """Forward, dK/dV and dQ lower through Pallas's Triton lowering for a CUDA target (the Triton compiler
    itself runs only on a GPU): what can be checked of the GPU path without one."""
    hlo = lowered_value_and_grads(flash_attention, 256, 64, 100, "cuda")
    kernels = [name for name in ("flash_attention_forward", "flash_attention_dkv", "flash_attention_dq")
               if f'name = "{name}"' in hlo]
    assert hlo.count("__gpu$xla.gpu.triton") == 3 and len(kernels) == 3, kernels


def test_splash_lowers_for_tpu_on_any_machine():
    """Splash's forward, dQ and dK/dV with segment ids lower through Mosaic for a TPU target."""
    hlo = lowered_value_and_grads(splash_attention, 512, 128, 256, "tpu")
    assert hlo.count("tpu_custom_call") == 3
    assert all(f"splash_mha_{phase}_segmented" in hlo for phase in ("fwd", "dq", "dkv"))


# ---------------------------------------------------------------------------------------------------------
# On the GPU: the same comparisons with the kernels compiled, in bfloat16, at model-like shapes


@on_gpu
@pytest.mark.parametrize("rows", ["all", "few-documents"])
@pytest.mark.parametrize("implementation,kernel", [("pallas", "pallas-triton"), ("cudnn", "cudnn-packed")])
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(8, 2, 64, None), (6, 2, 128, None), (4, 4, 64, 100)],
                         ids=["gqa-64", "gqa-128", "window"])
def test_gpu_kernels_match_the_reference(heads, kv_heads, head_dim, window, implementation, kernel, rows):
    """rows=all includes a row of more documents than cuDNN's packed layout takes (the batch then runs the
    Triton kernel); few-documents leaves it out, so cuDNN runs."""
    segments = jnp.asarray(layouts(512, seed=1)[[0, 1, 2, 3] if rows == "all" else [0, 2, 3, 3]])
    q, k, v, d_out = qkv(4, 512, heads, kv_heads, head_dim, jnp.bfloat16)
    want = value_and_grads(lambda q, k, v: reference(*(a.astype(jnp.float32) for a in (q, k, v)), segments,
                                                     sliding_window=window).astype(q.dtype), q, k, v, d_out)
    run = functools.partial(attention, segment_ids=segments, sliding_window=window, implementation=implementation)
    got = jax.jit(lambda *a: value_and_grads(run, *a))(q, k, v, d_out)
    assert_matches(got, want, 2e-2)
    with traced_kernels() as names:
        jax.eval_shape(run, q, k, v)
    assert names == [kernel]


@on_gpu
def test_gpu_auto_takes_cudnn_without_documents_and_the_triton_kernel_with_them():
    segments = jnp.asarray(layouts(512))
    q, k, v, _ = qkv(4, 512, 8, 2, 64, jnp.bfloat16)
    with traced_kernels() as names:
        jax.eval_shape(lambda q, k, v: attention(q, k, v, segments), q, k, v)
        jax.eval_shape(lambda q, k, v: attention(q, k, v), q, k, v)
    assert names == ["pallas-triton", "cudnn"]


@on_gpu
@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
def test_gpu_memory_grows_linearly_in_length(implementation):
    """Compiled temporary memory of one attention gradient at the llama-1b head shape, lengths 2k, 4k, 8k (cuDNN's
    packed layout from 4k, where its documents per row reach their fixed cap)."""
    def memory(length):
        q, k, v, _ = qkv(2, length, 32, 8, 64, jnp.bfloat16)
        segments = jnp.asarray(np.tile(layouts(length)[2:], (1, 1)))
        def loss(q, k, v):
            return attention(q, k, v, segments, implementation=implementation).astype(jnp.float32).sum()
        return temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)

    lengths = (2048, 4096, 8192) if implementation == "pallas" else (4096, 8192, 16384)
    sizes = [memory(n) for n in lengths]
    print(f"temp bytes at {lengths}:", sizes)
    assert sizes[1] <= 2.1 * sizes[0] and sizes[2] <= 2.1 * sizes[1], sizes
