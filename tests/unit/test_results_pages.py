"""The published results pages quote figures by hand (the page's table, the README's list). Every
quoted figure must be one that `longtail report` wrote into the page's `table.csv`: a figure typed
wrong, or left behind when the report was regenerated, fails here."""

import csv
import re

import pytest

from testkit import ROOT

PAGES = sorted(p.parent for p in (ROOT / "results").glob("*/table.csv"))
PCT = r"(\d+\.\d+)%"


def _rows(page):
    with open(page / "table.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _matches(row, final=None, best=None, many=None, medium=None) -> bool:
    """The csv row has these figures, as the pages round them (top-1 2 decimals, many/medium 1; a
    half is rounded either way: 63.05 may be quoted as 63.0 or 63.1)."""
    def same(key, text, places):
        return text is None or (row[key] != "" and abs(float(row[key]) - float(text)) <= 0.5 * 10 ** -places + 1e-9)

    return (same("final_top1_mean", final, 2) and same("best_top1_mean", best, 2)
            and same("final_many_mean", many, 1) and same("final_medium_mean", medium, 1))


def _method(name: str) -> str:
    """'HMM-LDAM-DRW (MM: s 26 ...)' -> 'HMM-LDAM-DRW'; 'extra: HMM-LDAM-DRW at s 19 ...' -> the same."""
    return name.removeprefix("extra:").strip().split()[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_figure_in_a_results_page_table_is_in_its_report(page):
    rows = _rows(page)
    quoted = re.findall(rf"^\| ([^|]+?) \| {PCT} \| {PCT} \| {PCT} / {PCT} \|", (page / "README.md").read_text(), re.M)
    assert quoted, f"{page.name}/README.md has no table of results"
    for name, final, best, many, medium in quoted:
        method = _method(name)
        found = [r for r in rows if r["method"] == method or r["label"].startswith(method)
                 or (name.startswith("extra:") and _matches(r, final, best, many, medium))]
        assert any(_matches(r, final, best, many, medium) for r in found), \
            f"{page.name}: the row {name!r} quotes {final}/{best}/{many}/{medium}, which its table.csv does not hold"


def test_every_figure_the_readme_quotes_from_a_results_page_is_in_its_report():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results on CIFAR-10-LT", 1)[1].split("\n## ", 1)[0]
    pages = [ROOT / "results" / name for name in re.findall(r"\(results/([^/]+)/README.md\)", section)]
    assert pages, "the README's results section links no results page"
    rows = [r for page in pages for r in _rows(page)]
    quoted = re.findall(rf"^- ([^:]+): {PCT} / {PCT}(?:; at s 19[^:]*: {PCT} / {PCT})?", section, re.M)
    assert len(quoted) >= 5
    for name, final, best, *extra in quoted:
        method = _method(name)
        assert any(r["method"] == method and _matches(r, final, best) for r in rows), (name, final, best)
        if extra[0]:  # the same method at another setting: an extra row of the table
            assert any(_matches(r, extra[0], extra[1]) for r in rows), (name, extra)
