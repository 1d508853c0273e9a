"""`jaxscale export RUN_DIR --hf OUT_DIR`: a run's checkpoint as a Hugging Face model directory (jaxscale.hf)."""
from __future__ import annotations

import argparse

from jaxscale.training import hf_export
from jaxscale.training.hf_export import export


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a run's checkpoint as a Hugging Face model directory",
                                   description=hf_export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run's directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--hf", required=True, metavar="OUT_DIR",
                        help="where to write config.json, *.safetensors and the tokenizer files (must not exist)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.hf, args.step)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {', '.join(files)} ({size / 1e9:.2f} GB of weights); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0

