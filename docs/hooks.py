"""MkDocs hooks: the pages that are generated at build time, so they cannot drift.

- ``configuration.md``: its ``<!-- generated: config-reference -->`` marker becomes the
  reference of every configuration key, read from the dataclasses themselves
  (:class:`smallgpt.config.TrainConfig`, its ``[data]`` and ``[optim]`` sections, and
  :class:`smallgpt.model.GPTConfig` as ``[model]``): name, type, default and the description
  from the class docstring's ``Attributes:`` section. A field without a description stops
  the build.
- ``results.md``: its ``<!-- generated: results -->`` marker becomes the current run blocks
  of ``benches/RESULTS.md`` (the newest block of each ``(bench, title)``, as
  ``benches/harness.py``'s ``current_runs`` picks them).
- ``results-archive.md`` is added to the site from ``benches/RESULTS-archive.md``, the record
  from before run blocks, under a note that says so.

The functions below need neither MkDocs nor the site: ``tests/test_docs_examples.py`` calls
them directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "RESULTS.md"
ARCHIVE = ROOT / "benches" / "RESULTS-archive.md"
CONFIG_MARK = "<!-- generated: config-reference -->"
RESULTS_MARK = "<!-- generated: results -->"
ARCHIVE_PAGE = "results-archive.md"


class DocsError(RuntimeError):
    """A generated page cannot be built (stops ``mkdocs build``)."""


# ----------------------------------------------------------------- configuration reference


def attribute_docs(cls: type) -> Dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s docstring (Google style): name -> text, with
    continuation lines joined."""
    doc = cls.__doc__ or ""
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: Dict[str, str] = {}
    indent: Optional[int] = None
    name = ""
    for line in lines[start + 1:]:
        if not line.strip():
            if name:
                break  # a blank line ends the section
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        m = re.match(r"(\w+):\s*(.*)$", line.strip())
        if width == indent and m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name:
            out[name] += " " + line.strip()
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``code`` to `code`, :class:`x.y.Z` to `Z`."""
    text = re.sub(r":(?:class|func|mod|meth|data):`~?([\w.]+)`",
                  lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def config_sections() -> List[Tuple[str, type, object]]:
    """``(section, dataclass, instance with the trainer's defaults)``; ``""`` is top level."""
    from smallgpt.config import TrainConfig

    cfg = TrainConfig()
    sections: List[Tuple[str, type, object]] = [("", TrainConfig, cfg)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, type(value), value))
    return sections


def config_reference() -> str:
    """The Markdown reference of every configuration key (see the module docstring)."""
    import typing

    parts: List[str] = []
    sections = config_sections()
    top_docs = attribute_docs(sections[0][1])
    for section, cls, obj in sections:
        docs = attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            if not docs.get(f.name):
                raise DocsError(f"{cls.__module__}.{cls.__name__}.{f.name} has no description "
                                "in the class docstring's Attributes section")
            key = f"{section}.{f.name}" if section else f.name
            rows.append(f"| `{key}` | `{_type_name(hints[f.name])}` | `{_toml_value(value)}` "
                        f"| {_cell(_rst_to_md(docs[f.name]))} |")
        title = f"`[{section}]`" if section else "Top level"
        paras = [p for p in inspect.cleandoc(cls.__doc__ or "").split("\n\n")
                 if p.strip() and not p.startswith("Attributes:")]
        if section:  # what TrainConfig says of its section first
            paras[0] = top_docs.get(section, paras[0])
        intro = "\n\n".join(_rst_to_md(p.replace("\n", " ")) for p in paras)
        parts.append(f"## {title}\n\n{intro}\n\nClass: `{cls.__module__}.{cls.__name__}`.\n\n"
                     "| key | type | default | description |\n|---|---|---|---|\n"
                     + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------- results


def _harness() -> Any:
    """``benches/harness.py``, imported by path (benches/ is not a package)."""
    name = "_smallgpt_bench_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / "harness.py")
    if spec is None or spec.loader is None:
        raise DocsError("cannot import benches/harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def current_blocks(text: str) -> List[Tuple[Dict[str, str], str]]:
    """The current run blocks of a RESULTS file: ``(meta, block text)``."""
    return _harness().current_runs(text)


def results_section(text: str) -> str:
    """The results page's generated part: an index, then each current block with its heading
    one level down (``## bench · title`` becomes ``### ...`` under ``## bench``)."""
    blocks = current_blocks(text)
    if not blocks:
        return ("*No run has been recorded in `benches/RESULTS.md` yet: the benches append "
                "their blocks when they are run (see Contributing).*\n")
    by_bench: Dict[str, List[Tuple[Dict[str, str], str]]] = {}
    for meta, block in blocks:
        by_bench.setdefault(meta["bench"], []).append((meta, block))
    index = ["| bench | run | date | commit |", "|---|---|---|---|"]
    body: List[str] = []
    for bench, runs in by_bench.items():
        body.append(f"## {bench}")
        for meta, block in runs:
            index.append(f"| `{bench}` | {_cell(meta['title'])} | {meta.get('date', '?')} "
                         f"| `{meta.get('commit', '?')}` |")
            body.append(site_links(re.sub(r"(?m)^(#+) ", r"#\1 ", block.strip())))
    return "\n".join(index) + "\n\n" + "\n\n".join(body) + "\n"


ARCHIVE_NOTE = (
    "# Earlier record (archive)\n\n"
    "!!! warning \"Not current figures\"\n"
    "    This is `benches/RESULTS-archive.md`, the record kept before the benches wrote "
    "run blocks: runs from earlier commits, some on machines that drifted, some superseded. "
    "It is shown as written (only its links adjusted to this site); the current figures "
    "are on the "
    "[results page](results.md).\n\n"
)


def site_links(text: str) -> str:
    """Relative links of a file under ``benches/`` made to work in the site: ``RESULTS.md``
    becomes the results page, ``RESULTS-archive.md`` the archive page, any other relative
    link plain text (its target is not part of the site)."""
    pages = {"RESULTS.md": "results.md", "RESULTS-archive.md": ARCHIVE_PAGE}

    def fix(m: re.Match[str]) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        name = target.split("#", 1)[0].rsplit("/", 1)[-1]
        return f"[{label}]({pages[name]})" if name in pages else label

    return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", fix, text)


def archive_page(text: str) -> str:
    """The archive as a page: the note, then the file with its own title demoted."""
    return ARCHIVE_NOTE + site_links(re.sub(r"(?m)^(#+) ", r"#\1 ", text))


# ----------------------------------------------------------------- MkDocs events


def on_files(files: Any, config: Any) -> Any:
    """Add the archive page (generated, so no copy of it lives under docs/)."""
    from mkdocs.structure.files import File

    text = ARCHIVE.read_text(encoding="utf-8") if ARCHIVE.exists() else "(no archive)\n"
    files.append(File.generated(config, ARCHIVE_PAGE, content=archive_page(text)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the generated parts of ``configuration.md`` and ``results.md``."""
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_reference())
    if RESULTS_MARK in markdown:
        text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
        markdown = markdown.replace(RESULTS_MARK, results_section(text))
    return markdown
