"""Attention kernels for packed documents on one GPU: each candidate's time (forward, forward + backward) and
error against XLA's reference, at the Llama 3.2 1B / 3B attention shapes, on three segment layouts.

    PYTHONPATH=. python experiments/attention_kernels.py [--layouts corpus,one,short256] [--tilings t128x64,...]
        [--shapes 1b-2k,3b-2k,1b-8k] [--no-others]
    PYTHONPATH=. python experiments/attention_kernels.py --sweep 3b-2k     # tiles of the Triton kernels

Candidates: cuDNN causal without segment ids (the speed to match), jaxscale's Pallas (Triton) flash kernels
with segment ids under a few tilings, cuDNN's packed layout (segment offsets and lengths, padding + causal
mask; its number of segments per row is static, here each layout's maximum), and JAX's Pallas `mha` with
segment ids (no grouped-query support: K and V repeated). Layouts: rows of the built-in corpus (as
`jaxscale bench` reads them), one document per row, documents of 256 tokens. Prints one table, last.
`--sweep` times the forward kernel's tilings, then the backward kernels' (with the default forward), on the
corpus layout, and prints the fastest combination as an entry of `flash_gpu.TILES_BY_HEAD_DIM`; with `--write`
it also appends that line to jaxscale/kernels/flash_gpu.py when it beats the current tiles (in a device call's
copy of the checkout, so that a bench later in the same call runs them; the line is then committed as printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxscale.data import build_dataset
from jaxscale.data.config import DataConfig
from jaxscale.kernels import flash_gpu
from jaxscale.kernels.attention import reference
from jaxscale.kernels.flash_gpu import Tiles, flash_attention, tiles_for

SHAPES = {  # batch, length, heads, kv heads, head size
    "1b-2k": (8, 2048, 32, 8, 64),
    "3b-2k": (4, 2048, 24, 8, 128),
    "1b-8k": (2, 8192, 32, 8, 64),
}
TILINGS = {
    "t128x64": Tiles(),
    "t128x128": Tiles(forward=(128, 128), dkv=(32, 128), dq=(128, 32), warps=8, stages=3, backward_warps=4,
                      backward_stages=3),
    "t64x64": Tiles(forward=(64, 64), dkv=(64, 64), dq=(64, 64), warps=4, stages=4, backward_warps=4,
                    backward_stages=3),
}


FORWARD_SWEEP = [Tiles(forward=block, warps=warps, stages=stages)
                 for block in ((128, 64), (128, 128), (64, 64), (128, 32))
                 for warps in (4, 8) for stages in (2, 3)]
BACKWARD_SWEEP = [Tiles(dkv=dkv, dq=dq, backward_warps=warps, backward_stages=stages)
                  for dkv, dq in (((64, 128), (128, 64)), ((32, 128), (128, 32)), ((64, 64), (64, 64)),
                                  ((32, 64), (64, 32)))
                  for warps in (4, 8) for stages in (2, 3)]


def layout(name: str, batch: int, length: int) -> np.ndarray:
    if name == "corpus":
        return build_dataset(DataConfig(), length).batch(0, batch)["segment_ids"][:, :-1].astype(np.int32)
    if name == "one":
        return np.ones((batch, length), np.int32)
    return np.broadcast_to(1 + np.arange(length) // 256, (batch, length)).astype(np.int32)


def cudnn_packed(q, k, v, segment_ids, most: int):
    """cuDNN flash attention on packed rows: each row's segments as offsets and lengths (at most `most`)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn

    batch, length = segment_ids.shape
    change = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = jax.vmap(lambda c: jnp.nonzero(c, size=most, fill_value=-1)[0])(change).astype(jnp.int32)
    ends = jnp.concatenate([starts[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    ends = jnp.where(ends < 0, length, ends)
    lengths = jnp.where(starts >= 0, ends - starts, -1)
    offsets = jnp.concatenate([starts, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    return cudnn(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                 scale=1 / math.sqrt(q.shape[-1]), mask_type=MaskType.PADDING_CAUSAL)


def jax_mha(q, k, v, segment_ids):
    from jax.experimental.pallas.ops.gpu.attention import mha

    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return mha(q, k, v, segment_ids, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True)


def timed(fn, *args, repeats: int = 10) -> float:
    """Median seconds of fn(*args), after one call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(attend, q, k, v, d_out, segment_ids):
    forward = jax.jit(attend)
    both = jax.jit(lambda q, k, v, d, s: jax.vjp(lambda q, k, v: attend(q, k, v, s), q, k, v)[1](d))
    return timed(forward, q, k, v, segment_ids), timed(both, q, k, v, d_out, segment_ids)


def value_and_grads(attend, q, k, v, d_out, segment_ids):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids), q, k, v)
    return (out, *vjp(d_out))


def max_error(attend, q, k, v, d_out, segment_ids) -> float:
    """Largest error of output and gradients against XLA's reference (float32 from the same inputs), relative
    to each one's largest entry; on the first row only."""
    args = [a[:1] for a in (q, k, v, d_out, segment_ids)]
    got = jax.jit(functools.partial(value_and_grads, attend))(*args)
    f32 = [a.astype(jnp.float32) for a in args[:4]]
    want = jax.jit(functools.partial(value_and_grads, reference))(*f32, args[4])
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want))


def inputs(shape_name: str):
    batch, length, heads, kv_heads, head_dim = SHAPES[shape_name]
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, jnp.bfloat16)


def sweep(shape_name: str, write: bool) -> None:
    """Forward tilings ranked by forward time; backward tilings by forward + backward time, all with the default
    forward tiles. The fastest of each, combined, is timed against tiles_for(head size) and cuDNN."""
    q, k, v, d_out = inputs(shape_name)
    segment_ids = jnp.asarray(layout("corpus", q.shape[0], q.shape[1]))
    timings = {}
    for part, candidates in (("forward", FORWARD_SWEEP), ("backward", BACKWARD_SWEEP)):
        for tiles in candidates:
            try:
                forward, both = measure(functools.partial(flash_attention, tiles=tiles), q, k, v, d_out, segment_ids)
            except Exception as e:  # a tiling Triton cannot compile (shared memory) is skipped
                print(f"{part} {tiles}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            timings.setdefault(part, []).append((forward if part == "forward" else both, tiles))
            print(part, tiles, f"{forward * 1e3:.3f} / {both * 1e3:.3f} ms", flush=True)
    fastest_forward = min(timings["forward"], key=lambda t: t[0])[1]
    fastest_backward = min(timings["backward"], key=lambda t: t[0])[1]
    best = dataclasses.replace(fastest_backward, forward=fastest_forward.forward, warps=fastest_forward.warps,
                               stages=fastest_forward.stages)
    rows = {"cudnn causal, no segments": measure(
        lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        q, k, v, d_out, None)}
    for name, tiles in (("pallas, tiles_for(head size)", tiles_for(q.shape[-1])), ("pallas, fastest tiles", best)):
        rows[name] = measure(functools.partial(flash_attention, tiles=tiles), q, k, v, d_out, segment_ids)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {shape_name}, corpus layout")
    line = f"TILES_BY_HEAD_DIM[{q.shape[-1]}] = {best!r}"
    print("fastest:", line)
    print("| kernel | forward ms | forward + backward ms | / cuDNN causal |")
    print("| --- | --- | --- | --- |")
    cudnn_both = rows["cudnn causal, no segments"][1]
    for name, (forward, both) in rows.items():
        print(f"| {name} | {forward * 1e3:.3f} | {both * 1e3:.3f} | {both / cudnn_both:.2f} |")
    if write and rows["pallas, fastest tiles"][1] < rows["pallas, tiles_for(head size)"][1]:
        source = pathlib.Path(flash_gpu.__file__)
        source.write_text(source.read_text() + f"{line}  # written by attention_kernels.py --sweep --write\n")
        print("appended to", source)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--layouts", default="corpus,one,short256")
    parser.add_argument("--tilings", default=",".join(TILINGS))
    parser.add_argument("--no-others", action="store_true", help="jaxscale's kernels only (no cuDNN packed, mha)")
    parser.add_argument("--sweep", metavar="SHAPE", help="time tilings of the Triton kernels at this shape")
    parser.add_argument("--write", action="store_true", help="with --sweep: put the fastest tiles in flash_gpu.py")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.sweep, args.write)
    rows = []
    for shape_name in args.shapes.split(","):
        q, k, v, d_out = inputs(shape_name)
        batch, length = q.shape[:2]
        fwd, both = measure(lambda q, k, v, _: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                             implementation="cudnn"),
                            q, k, v, d_out, None)
        base = both
        rows.append((shape_name, "-", "cudnn causal, no segments", fwd, both, 1.0, None))
        print(rows[-1], flush=True)
        for layout_name in args.layouts.split(","):
            segment_ids = jnp.asarray(layout(layout_name, batch, length))
            most = int(jax.device_get(jnp.max(segment_ids[:, -1] - segment_ids[:, 0] + 1)))
            candidates = {f"pallas {name}": functools.partial(flash_attention, tiles=TILINGS[name])
                          for name in args.tilings.split(",")}
            if not args.no_others:
                candidates[f"cudnn packed, {most} segments"] = functools.partial(cudnn_packed, most=max(most, 2))
                if shape_name == "1b-2k" and layout_name == "corpus":
                    candidates["jax pallas mha (K, V repeated)"] = jax_mha
            for name, attend in candidates.items():
                try:
                    fwd, both = measure(attend, q, k, v, d_out, segment_ids)
                    error = max_error(attend, q, k, v, d_out, segment_ids) if length <= 2048 else None
                except Exception as e:  # a candidate that cannot run says why, and the table goes on
                    print(f"{shape_name} {layout_name} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append((shape_name, layout_name, name, fwd, both, both / base, error))
                print(rows[-1], flush=True)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| shape | layout | kernel | forward ms | forward + backward ms | / cuDNN causal | max rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape_name, layout_name, name, fwd, both, ratio, error in rows:
        err = "-" if error is None else f"{error:.1e}"
        print(f"| {shape_name} | {layout_name} | {name} | {fwd * 1e3:.3f} | {both * 1e3:.3f} | {ratio:.2f} | {err} |")


if __name__ == "__main__":
    main()
