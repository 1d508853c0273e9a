"""Import a Llama-1B-shaped Hugging Face checkpoint: seconds and peak host memory (needs torch and transformers
to write it, jaxscale to read it).

    python experiments/hf_import_bench.py WORK_DIR

Writes WORK_DIR/llama-1b with transformers (Llama 3.2 1B's shape, random weights, bfloat16 safetensors), then
runs `jaxscale.hf.load` on it in a fresh process (float32 parameters on the first device) and prints the time it
took, the process's peak resident memory (ru_maxrss) before and after, and the peaks of its anonymous and
file-backed parts (/proc/self/status, sampled every 10 ms; the file-backed part is the memory-mapped
safetensors pages, which the kernel can drop at any time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOAD = r"""
import json, resource, sys, threading, time
import jax, numpy as np

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile")}  # GiB

peaks = status()
stop = threading.Event()
def sample():
    while not stop.wait(0.01):
        for k, v in status().items():
            peaks[k] = max(peaks[k], v)
jax.devices()
import jaxscale.hf
before = {"maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **status()}
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
model, params = jaxscale.hf.load(sys.argv[1])
jax.block_until_ready(params)
seconds = time.perf_counter() - start
stop.set()
logits = model.apply(params, np.arange(16, dtype=np.int32)[None], compute_dtype=jax.numpy.bfloat16)
print(json.dumps({"seconds": seconds, "before": before,
                  "peak_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "peak_rss_anon_gib": peaks["RssAnon"], "peak_rss_file_gib": peaks["RssFile"],
                  "parameters": model.param_count(), "device": str(jax.devices()[0]),
                  "finite_logits": bool(np.isfinite(np.asarray(logits[..., :model.cfg.vocab_size])).all())}))
"""


def write_checkpoint(directory: Path) -> float:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    theta = 500000.0
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rope = ({"rope_parameters": {"rope_theta": theta, **scaling}} if int(transformers.__version__.split(".")[0]) >= 5
            else {"rope_theta": theta, "rope_scaling": scaling})
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                         **rope)
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return time.perf_counter() - start


if __name__ == "__main__":
    work = Path(sys.argv[1])
    directory = work / "llama-1b"
    written = write_checkpoint(directory)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    print(f"transformers wrote {directory} ({size / 1e9:.2f} GB of safetensors) in {written:.1f} s")
    # python -c puts the working directory first on sys.path: run where no other jaxscale checkout is
    path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    run = subprocess.run([sys.executable, "-c", LOAD, str(directory.resolve())], capture_output=True, text=True,
                         cwd=work, env={**os.environ, "PYTHONPATH": path})
    if run.returncode:
        sys.exit(f"loading failed:\n{run.stderr[-4000:]}")
    print(json.dumps(json.loads(run.stdout.strip().splitlines()[-1]), indent=1))
