"""The installed package: an extension that links no libpython, a tokenizer without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from smallgpt import _bpe


def test_tokenizer_needs_neither_torch_nor_numpy():
    code = (
        "import sys\n"
        "from smallgpt import Tokenizer\n"
        "tok = Tokenizer.train(['low lower lowest'] * 4, vocab_size=270)\n"
        "assert tok.decode(tok.encode_ordinary('lowest low')) == 'lowest low'\n"
        "print(sorted({'torch', 'numpy'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("readelf") is None,
    reason="reads the ELF dynamic section with readelf",
)
def test_extension_links_no_libpython():
    # Linking libpython would tie the abi3 extension to one interpreter's shared library.
    assert _bpe.__file__.endswith(".abi3.so")
    dynamic = subprocess.run(
        ["readelf", "-d", _bpe.__file__], capture_output=True, text=True, check=True
    ).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [line for line in needed if "libpython" in line], needed
