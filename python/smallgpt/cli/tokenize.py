"""``smallgpt-tokenize``: corpus files → tokenizer.json + llm.c token shards + meta.json."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from smallgpt.cli import OneLineParser, fail

PROG = "smallgpt-tokenize"
USAGE_EXAMPLES = """examples:
  smallgpt-tokenize books/ --out data/books --vocab-size 8192           # train a tokenizer too
  smallgpt-tokenize 'web/*.jsonl' --out data/web --gpt2 gpt2_files/      # GPT-2 vocabulary
  smallgpt-tokenize input.txt --out data/shakespeare --tokenizer tok.json --val-fraction 0.1
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Tokenize text files into llm.c-format token shards.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="files, directories or globs (.txt, .jsonl, .parquet)")
    p.add_argument("--out", required=True, help="output directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vocab-size", type=int, help="train a new tokenizer of this size")
    src.add_argument("--tokenizer", help="tokenizer file: ours, HF tokenizer.json, or .tiktoken")
    src.add_argument("--gpt2", metavar="DIR", help="folder with encoder.json and vocab.bpe")
    p.add_argument("--pattern", default="gpt4", help="pre-tokenizer: gpt2, cl100k/gpt4, o200k "
                   "or a regex (when training; default gpt4)")
    p.add_argument("--max-token-length", type=int, metavar="BYTES",
                   help="when training: no token longer than this (2 to 65535, the default)")
    p.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"],
                   help="special tokens of a trained tokenizer (default <|endoftext|>)")
    p.add_argument("--doc-separator", help="split .txt files into documents on this string "
                   "(escapes like \\n are understood)")
    p.add_argument("--text-field", default="text",
                   help="JSON field of .jsonl documents / column of .parquet ones")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="fraction of documents (of characters for one document) for validation")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    p.add_argument("--workers", type=int, help="threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: fail (naming file and offset) or replace with U+FFFD")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from smallgpt.corpus import tokenize_corpus

    sep = args.doc_separator
    if sep is not None:
        sep = sep.encode("utf-8").decode("unicode_escape") if "\\" in sep else sep
        if not sep:
            return fail(PROG, "--doc-separator is empty")
    try:
        meta = tokenize_corpus(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            gpt2_dir=args.gpt2,
            vocab_size=args.vocab_size,
            pattern=args.pattern,
            special_tokens=args.special_tokens,
            max_token_length=args.max_token_length,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            doc_separator=sep,
            text_field=args.text_field,
            dtype=args.dtype,
            workers=args.workers,
            overwrite=args.overwrite,
            errors=args.errors,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:
        print("smallgpt-tokenize: interrupted; no shard was written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        return fail(PROG, e)
    if not args.quiet:
        for name, s in meta["splits"].items():
            print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens, "
                  f"{s['bytes']:,} bytes, {len(s['shards'])} shard(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
