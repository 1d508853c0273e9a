"""Where the torch peer's step spends its GPU time, in the kinds `jaxscale bench --profile` reports, to set the
two side by side. The peer (../shared/peers/torch_gpt.py) is copied to .peers/ as for gpu_compare.sh.

Usage: python experiments/torch_peer_profile.py --layers 12 --d-model 768 --heads 12 --batch 32
It warms up for 10 s first, as jaxscale bench does on a GPU, so that the clock has settled under the power cap.
"""
import argparse
import runpy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from jaxscale.trace_summary import device_time, format_summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()

    peer = runpy.run_path(".peers/torch_gpt.py")  # its model; the step below is the one its main() times
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = peer["GPT"](50304, 1024, a.d_model, a.heads, a.layers).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    compiled = torch.compile(model)

    def step():
        x = torch.randint(0, 50304, (a.batch, 1025), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    while time.perf_counter() - start < a.warmup_s:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()

    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]  # times in µs, as in a jax trace
    label = f"torch peer ({a.layers} layers, d_model {a.d_model}, batch {a.batch})"
    print(format_summary([device_time(label, kernels, a.steps, a.top)]))


if __name__ == "__main__":
    main()
