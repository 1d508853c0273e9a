"""`jaxscale tokenizer train`: fit a byte-level BPE tokenizer.json on text files or the built-in corpus."""
from __future__ import annotations

import argparse
import re

from jaxscale.data.errors import DataError
from jaxscale.data.tokenizers import train_tokenizer

# The data package's messages name the config keys (and train_tokenizer's arguments) to fix; here the user gave
# these instead.
FLAG_FOR = {"data.source": "the sources given to `jaxscale tokenizer train`", "data.text_field": "--text-field",
            "data.text_documents": "--text-documents", "data.hf_split": "--hf-split", "vocab_size": "--vocab-size"}


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
    train.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset source (hf:...)")
    train.set_defaults(func=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    try:
        vocab_size = train_tokenizer(args.sources, args.vocab_size, args.out, text_field=args.text_field,
                                     text_documents=args.text_documents, hf_split=args.hf_split)
    except DataError as e:
        raise DataError(in_flag_terms(str(e))) from e
    print(f"wrote {args.out}: {vocab_size} tokens; use it with data.tokenizer: {args.out} "
          f"and model.vocab_size: {vocab_size}")
    return 0


def in_flag_terms(message: str) -> str:
    """`message` with each config key it names replaced by the flag of this command that sets it."""
    keys = "|".join(re.escape(key) for key in FLAG_FOR)
    return re.sub(rf"(?<![\w.-])({keys})\b", lambda m: FLAG_FOR[m.group(1)], message)
