"""``smallgpt-tokenize``: corpus files → tokenizer.json + llm.c token shards + meta.json."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from smallgpt.cli import ESCAPES_HELP, OneLineParser, fail, fraction, int_in, unescape

PROG = "smallgpt-tokenize"
USAGE_EXAMPLES = """examples:
  smallgpt-tokenize books/ --out data/books --vocab-size 8192           # train a tokenizer too
  smallgpt-tokenize 'web/*.jsonl' --out data/web --gpt2 gpt2_files/      # GPT-2 vocabulary
  smallgpt-tokenize input.txt --out data/shakespeare --tokenizer tok.json --val-fraction 0.1
"""


def build_parser() -> argparse.ArgumentParser:
    from smallgpt import _bpe
    from smallgpt.corpus import MAX_SHARD_TOKENS, MIN_SHARD_TOKENS

    p = OneLineParser(
        prog=PROG,
        description="Tokenize text files into llm.c-format token shards.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="files, directories or globs (.txt/.text/.md, "
                   ".jsonl/.ndjson, .parquet; a file named directly with another suffix is "
                   "read as text)")
    p.add_argument("--out", required=True, help="output directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vocab-size", type=int, help="train a new tokenizer of this size")
    src.add_argument("--tokenizer", help="tokenizer file: ours, HF tokenizer.json, or .tiktoken")
    src.add_argument("--gpt2", metavar="DIR", help="folder with encoder.json and vocab.bpe")
    p.add_argument("--pattern", help="pre-tokenizer: gpt2, cl100k/gpt4, o200k or a regex; when "
                   "training (default gpt4) or for a .tiktoken file that is not OpenAI's")
    p.add_argument("--special-tokens", nargs="*",
                   help="special tokens when training or for a .tiktoken file that is not "
                   "OpenAI's, given the ids after the others (default <|endoftext|>)")
    p.add_argument("--max-token-length", type=int_in(2, _bpe.MAX_TOKEN_LENGTH), metavar="BYTES",
                   help=f"when training: no token longer than this ({_bpe.MAX_TOKEN_LENGTH}, "
                   "the most the encoder holds, by default)")
    p.add_argument("--doc-separator", help="split text files into documents on this string "
                   f"({ESCAPES_HELP})")
    p.add_argument("--text-field", default="text",
                   help="JSON field of .jsonl documents / column of .parquet ones")
    p.add_argument("--val-fraction", type=fraction, default=0.005,
                   help="fraction of documents (of characters for one document) for validation")
    p.add_argument("--shard-tokens", type=int_in(MIN_SHARD_TOKENS, MAX_SHARD_TOKENS),
                   default=100_000_000,
                   help=f"tokens per shard (default 100M, at least {MIN_SHARD_TOKENS})")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    p.add_argument("--workers", type=int_in(1, _bpe.MAX_THREADS),
                   help="threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8 (or a lone surrogate escape in JSON): fail, naming file "
                   "and place, or replace with U+FFFD")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _cli_message(error: BaseException) -> str:
    """The message of an error of the Python API, with its argument names as CLI flags."""
    return str(error).replace('pass errors="replace"', "pass --errors replace")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``smallgpt-tokenize``; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    from smallgpt.corpus import tokenize_corpus

    sep = args.doc_separator
    if sep is not None:
        sep = unescape(sep)
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
        return fail(PROG, _cli_message(e))
    if not args.quiet:
        for name, s in meta["splits"].items():
            print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens, "
                  f"{s['bytes']:,} bytes, {len(s['shards'])} shard(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
