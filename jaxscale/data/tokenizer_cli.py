"""`jaxscale tokenizer train`: fit a byte-level BPE tokenizer.json on text files or the built-in corpus."""
from __future__ import annotations

import argparse

from jaxscale.data.tokenizers import train_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tokenizer train` on the CLI's subparsers; run the choice as args.func(args) -> exit code."""
    parser = subparsers.add_parser("tokenizer",
                                   help="fit a byte-level BPE tokenizer.json on text (subcommand: train)")
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser("train", help="fit a byte-level BPE tokenizer.json "
                                "(vocabulary padded to a multiple of 128)")
    train.add_argument("sources", nargs="*", default=["builtin"],
                       help="text files, globs or source specs (default: builtin, the text shipped "
                            "with Python)")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, rounded up to 128s")
    train.add_argument("--out", required=True, help="where to write tokenizer.json")
    train.add_argument("--text-field", default="text", help="text field of JSON Lines / Parquet records")
    train.add_argument("--text-documents", choices=("file", "paragraph"), default="file",
                       help="plain text files are one document per file or per blank-line paragraph")
    train.set_defaults(func=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    vocab_size = train_tokenizer(args.sources, args.vocab_size, args.out, text_field=args.text_field,
                                 text_documents=args.text_documents)
    print(f"wrote {args.out}: {vocab_size} tokens; use it with data.tokenizer: {args.out} "
          f"and model.vocab_size: {vocab_size}")
    return 0
