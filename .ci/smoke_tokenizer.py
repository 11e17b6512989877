"""Smoke test of an installed smallgpt (wheel or sdist) in a bare virtual environment.

Run by .ci/wheel_check.sh with the venv's interpreter, from outside the source tree, after
`pip install --no-deps <wheel or sdist>` and `pip install regex` (for the pure-Python
reference only). Checks that the extension imports on this interpreter without torch or
numpy, trains a tiny vocabulary exactly as the reference does, and round-trips text.
"""

from __future__ import annotations

import os
import sys
import tempfile

import smallgpt
from smallgpt import Tokenizer, _bpe
from smallgpt import reference_bpe as ref

prefix = os.path.realpath(sys.prefix)
for mod in (smallgpt, _bpe):
    where = os.path.realpath(mod.__file__)
    assert where.startswith(prefix + os.sep), f"{mod.__name__} imported from {where}, not {prefix}"
assert _bpe.__file__.endswith(".abi3.so"), _bpe.__file__
heavy = sorted({"torch", "numpy"} & set(sys.modules))
assert not heavy, f"importing the tokenizer pulled in {heavy}"

texts = [
    "the cat sat on the mat; the cat ate the rat.",
    "Über café naïve — 東京 and 東京タワー, the the the!",
    "low lower lowest newer newest wider wide 12345 2024",
] * 3
tok = Tokenizer.train(texts, vocab_size=300, pattern="gpt4")
merges = ref.train(texts, vocab_size=300 - 1, pattern="gpt4")
assert tok.merges == merges, "Rust training differs from the Python reference"
assert tok.vocab_size == 256 + len(merges) + 1 and tok.eot_id == tok.vocab_size - 1

sample = "the newest café in 東京 ate the cat 🐈"
ids = tok.encode_ordinary(sample)
assert ids == ref.encode(sample, merges, "gpt4"), "Rust encoding differs from the reference"
assert len(ids) < len(sample.encode("utf-8")), "no merge applied"
assert tok.decode(ids) == sample
assert tok.decode_bytes(ids) == ref.decode(ids, merges)
assert tok.encode("cat<|endoftext|>", allowed_special="all")[-1] == tok.eot_id
assert tok.encode_batch([sample, "the cat"]) == [ids, tok.encode_ordinary("the cat")]

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "tok.json")
    tok.save(path)
    again = Tokenizer.load(path)
assert again.merges == tok.merges and again.encode_ordinary(sample) == ids

print(
    f"smoke ok: CPython {sys.version.split()[0]}, {len(merges)} merges, "
    f"{len(ids)} ids, {os.path.relpath(_bpe.__file__, prefix)}"
)
