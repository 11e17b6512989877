"""The documentation's generated pages (docs/hooks.py): the configuration reference covers
every configuration key, and the results page shows the current run blocks of RESULTS.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from smallgpt.config import DataSection, OptimSection, TrainConfig
from smallgpt.model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smallgpt_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def block(bench: str, title: str, date: str, body: str) -> str:
    meta = f'{{"bench": "{bench}", "title": "{title}", "date": "{date}", "commit": "abc1234"}}'
    return f"## {bench} · {title}\n<!-- smallgpt-bench {meta} -->\n\nDate: {date}.\n\n{body}\n"


def test_config_reference_has_every_key_with_its_default() -> None:
    text = hooks.config_reference()
    cfg = TrainConfig()
    for section, cls, obj in (("", TrainConfig, cfg), ("model", GPTConfig, cfg.model),
                              ("data", DataSection, cfg.data), ("optim", OptimSection, cfg.optim)):
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            key = f"{section}.{f.name}" if section else f.name
            row = next((x for x in text.splitlines() if x.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{key} is missing from the reference"
            assert f"| `{hooks._toml_value(value)}` |" in row, row
            assert row.rstrip().endswith("|") and len(row.split("|")[4].strip()) > 10, row
    assert "| `model.vocab_size` | `int` | `0` |" in text  # the trainer's default, not GPT-2's


def test_a_field_without_a_description_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hooks.attribute_docs

    def without_lr(cls: type) -> dict:
        docs = real(cls)
        return {k: v for k, v in docs.items() if not (cls is OptimSection and k == "lr")}

    monkeypatch.setattr(hooks, "attribute_docs", without_lr)
    with pytest.raises(hooks.DocsError, match="OptimSection.lr has no description"):
        hooks.config_reference()


def test_attribute_docs_reads_google_style_sections() -> None:
    class Example:
        """Summary.

        Attributes:
            alpha: First line
                and its continuation.
            beta: Second.

        After the section.
        """

    assert hooks.attribute_docs(Example) == {"alpha": "First line and its continuation.",
                                             "beta": "Second."}


def test_results_page_shows_the_newest_block_of_each_bench_and_title() -> None:
    text = "# Benchmark results\n\nIntro with a [link](RESULTS-archive.md).\n\n" + "\n".join([
        block("bench_a", "one", "2026-12-04T10:00", "| x |\n|---|\n| 1.11 |"),
        block("bench_b", "two", "2026-12-04T11:00", "see [the archive](RESULTS-archive.md)"),
        block("bench_a", "one", "2026-12-04T12:00", "| x |\n|---|\n| 2.22 |"),
    ])
    page = hooks.results_section(text)
    assert "2.22" in page and "1.11" not in page
    assert page.index("## bench_a") < page.index("### bench_a · one") < page.index("## bench_b")
    assert "[the archive](results-archive.md)" in page
    assert "| `bench_a` | one | 2026-12-04T12:00 | `abc1234` |" in page
    assert "No run has been recorded" in hooks.results_section("# Benchmark results\n")


def test_archive_page_links_stay_inside_the_site() -> None:
    page = hooks.archive_page("# Old\n\nSee [`RESULTS.md`](RESULTS.md), [x](harness.py) and "
                              "[web](https://example.org).\n")
    assert "[`RESULTS.md`](results.md)" in page and "[x]" not in page and " x " in page
    assert "[web](https://example.org)" in page and "## Old" in page
    assert page.startswith(hooks.ARCHIVE_NOTE)


def test_the_site_is_configured_strict_with_the_hooks() -> None:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "strict: true" in text and "docs/hooks.py" in text
    assert hooks.CONFIG_MARK in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert hooks.RESULTS_MARK in (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    nav_pages = {line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.strip().startswith("- ") and line.strip().endswith(".md")}
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk <= nav_pages and nav_pages - on_disk == {hooks.ARCHIVE_PAGE}
