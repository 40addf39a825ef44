"""A results page that commits its MLflow store (`mlflow-store.tgz`) must be what `longtail report`
writes from that store: the command its table.md states, re-run on the unpacked store, gives the same
table.csv, published.csv and per-run numbers. So a page cannot drift from its runs, and it can be
regenerated (or extended with new runs) after the machine that ran them is gone."""

import pytest

from testkit import ROOT
from testkit.regenerate import data_files, regenerate, stated_command, with_out, without_source

pytestmark = pytest.mark.slow
PAGES = sorted(p.parent for p in (ROOT / "results").glob("*/mlflow-store.tgz") if (p.parent / "table.md").exists())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_a_results_page_is_what_its_committed_store_regenerates(page, tmp_path):
    out = regenerate(page / "table.md", page / "mlflow-store.tgz", tmp_path / "store")
    committed, regenerated = data_files(page), data_files(out)
    assert "table.csv" in committed
    assert sorted(regenerated) == sorted(committed)
    for name, data in committed.items():
        assert regenerated[name] == data, f"{page.name}/{name} is not what its store regenerates"
    stated = stated_command(page / "table.md")
    assert stated[stated.index("--out") + 1] == f"results/{page.name}", f"{page.name}/table.md was not written into the page"
    assert with_out(stated_command(out / "table.md"), f"results/{page.name}") == stated
    assert without_source((out / "table.md").read_text()) == without_source((page / "table.md").read_text())


def test_there_is_a_page_with_its_store_to_check():
    assert PAGES, "no results page commits its MLflow store"
