"""The benches' own logic that decides what a figure means: the tune/report split, ties,
variant arguments. (The benches themselves are run by hand, on an idle machine.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

import harness  # noqa: E402
import recipe_data  # noqa: E402
from recipe_data import Book  # noqa: E402


def _manifest() -> list:
    return [Book(f"corpus/en_gutenberg_0{f}.txt", 0, 20_000 + (37_013 * i * f) % 700_000,
                 f"Author {i % 9}", f"Title {f}-{i}", f"{f:02d}{i:038d}")
            for f in range(1, 9) for i in range(60)]


def test_split_is_deterministic_disjoint_and_from_its_pool() -> None:
    rows = _manifest()
    sets = {w: recipe_data.select(rows, w) for w in recipe_data.SETS}
    assert sets == {w: recipe_data.select(list(reversed(rows)), w) for w in recipe_data.SETS}
    used = []
    for which, (train, val) in sets.items():
        assert {b.file for b in train + val} <= set(recipe_data.POOLS[which])
        assert not {b.author for b in train} & {b.author for b in val}
        assert 1_000_000 <= sum(b.length for b in val) <= 1_150_000
        assert 11_900_000 <= sum(b.length for b in train) <= 12_300_000
        used += train + val
    assert len(used) == len(set(used))  # no book in two places
    assert not {b.file for b in sets["report"][0] + sets["report"][1]} & {
        "corpus/en_gutenberg_01.txt", "corpus/en_gutenberg_02.txt"}


def test_a_report_set_never_holds_a_book_tuned_on_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _manifest()
    title = recipe_data.select(rows, "report")[1][0].title
    monkeypatch.setattr(recipe_data, "TUNED_BEFORE", ("corpus/none.txt", title))
    with pytest.raises(SystemExit, match=title):
        recipe_data.select(rows, "report")


def test_compare_calls_a_difference_within_the_spread_a_tie() -> None:
    assert harness.compare([2.0, 2.1, 2.2], [2.05, 2.15, 2.25]).startswith("tie")
    assert harness.compare([2.0, 2.01, 2.02], [2.5, 2.51, 2.52],
                           names=("ours", "theirs")).startswith("ours better by 0.500")


def test_variant_arguments() -> None:
    import bench_ablation

    assert bench_ablation.parse_variant("lr 3e-3=--optim.lr 3e-3 --set 'x=a b'") == (
        "lr 3e-3", ["--optim.lr", "3e-3", "--set", "x=a b"])
    for bad in ("no equals sign", "=--optim.lr 1", "baseline=--optim.lr 1"):
        with pytest.raises(SystemExit):
            bench_ablation.parse_variant(bad)
    assert harness.parse_seeds("1,2,3") == [1, 2, 3]
    for bad in ("1,1", "", "a", "-1"):
        with pytest.raises(SystemExit):
            harness.parse_seeds(bad)
