"""Report figures from run artifacts: per-class error of chosen rows, margins per setting, and each
run's own figures."""

from __future__ import annotations

import csv
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import LongtailError
from .table import Table, cells_method, column_label, summarize


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def _read_per_class(path: Path) -> tuple[list[int], list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: int(r["class"]))
    return [int(r["train_images"]) for r in rows], [r["name"] for r in rows]


def _read_margins(path: Path, num_classes: int) -> list:
    import numpy as np

    by_class = [[] for _ in range(num_classes)]
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            by_class[int(r["class"])].append(float(r["margin"]))
    return [np.asarray(v) for v in by_class]


class Artifacts:
    """Downloads evaluate-run artifacts once each (into a temporary folder)."""

    def __init__(self, fetch):
        self.fetch, self.tmp = fetch, Path(tempfile.mkdtemp(prefix="longtail-report-"))
        self.cache: dict = {}

    def get(self, run_id: str, name: str) -> Path | None:
        key = (run_id, name)
        if key not in self.cache:
            self.cache[key] = self.fetch(run_id, f"evaluation/{name}", self.tmp / run_id)
        return self.cache[key]

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _resolve_labels(t: Table, wanted: list[str]) -> list[str]:
    out = []
    for w in wanted:
        if w in t.rows:
            out.append(w)
            continue
        labels = [lbl for lbl in t.rows if cells_method(t.cells, lbl) == w]
        if len(labels) != 1:
            raise LongtailError(f"--compare: {'no' if not labels else 'several'} rows for {w!r} "
                                f"(rows: {'; '.join(t.rows) or 'none'})")
        out.append(labels[0])
    return out


def compare_figures(t: Table, wanted: list[str], arts: Artifacts, out_dir: Path) -> list[Path]:
    """Per-class final-epoch error of the chosen rows in every setting they share (the MM paper's figure)."""
    from .. import figures

    labels = list(dict.fromkeys(_resolve_labels(t, wanted)))
    if len(labels) < 2:
        raise LongtailError(f"--compare needs two or more different rows, got {', '.join(wanted)}")
    written = []
    for col in t.columns:
        cells = [t.cells.get((lbl, col)) for lbl in labels]
        if any(c is None for c in cells):
            continue
        per_class = arts.get(cells[0].runs[0]["run_id"], "per_class.csv")
        if per_class is None:
            continue
        counts, classes = _read_per_class(per_class)
        series = {}
        for lbl, cell in zip(labels, cells):
            vals = cell.class_values("final")
            err, std = [], []
            for i in range(len(counts)):
                m, s, n = summarize([100 * (1 - v) for v in vals.get(i, [])])
                err.append(m)
                std.append(s)
            series[f"{lbl} (n={len(cell.runs)})"] = (err, std if len(cell.runs) > 1 else None)
        path = out_dir / f"per_class_error_{'_vs_'.join(slug(x) for x in labels)}_{slug(column_label(col))}.png"
        figures.per_class_compare(counts, series, classes, path,
                                  title=f"per-class test error, final epoch, {column_label(col)}")
        written.append(path)
    return written


def margin_figures(t: Table, arts: Artifacts, out_dir: Path) -> list[Path]:
    """Per setting: the per-class margin distribution of each row's first-seed run."""
    from .. import figures

    written = []
    for col in t.columns:
        series, counts, classes = {}, None, None
        for lbl in t.rows:
            cell = t.cells.get((lbl, col))
            if cell is None:
                continue
            run = cell.runs[0]
            pc, mg = arts.get(run["run_id"], "per_class.csv"), arts.get(run["run_id"], "margins.csv")
            if pc is None or mg is None:
                continue
            if counts is None:
                counts, classes = _read_per_class(pc)
            series[f"{lbl} (seed {run['seed']})"] = _read_margins(mg, len(counts))
        if series:
            path = out_dir / f"margins_{slug(column_label(col))}.png"
            figures.margins_compare(counts, series, classes, path,
                                    title=f"per-class test margins of the final model, {column_label(col)}")
            written.append(path)
    return written


RUN_FIGURES = ("curves.png", "confusion.png", "per_class.png", "acc_vs_count.png", "margins.png")
# the figures' numbers, beside them: every epoch's lr / loss / accuracies, and the per-class accuracies
RUN_TABLES = ("history.csv", "per_class.csv")


def run_figures(run: dict, arts: Artifacts, out_dir: Path) -> list[Path]:
    """One run's figures: the PNGs its evaluate stage logged (the newer ones re-drawn from its CSVs when
    the run predates them), and the CSVs they were drawn from, so a figure's numbers can be read."""
    from .. import figures

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in RUN_FIGURES:
        src = arts.get(run["run_id"], name)
        dst = out_dir / name
        if src is not None:
            shutil.copyfile(src, dst)
        elif name in ("acc_vs_count.png", "margins.png") and (pc := arts.get(run["run_id"], "per_class.csv")):
            counts, classes = _read_per_class(pc)
            if name == "acc_vs_count.png":
                with open(pc, newline="") as fh:
                    rows = sorted(csv.DictReader(fh), key=lambda r: int(r["class"]))
                acc = [[float(r[k]) if r[k] not in ("", "None") else None for r in rows] for k in ("acc_final", "acc_best")]
                figures.acc_vs_count(counts, acc[0], acc[1], classes, dst)
            elif (mg := arts.get(run["run_id"], "margins.csv")) is not None:
                figures.margins(_read_margins(mg, len(counts)), counts, classes, dst)
            else:
                continue
        else:
            continue
        written.append(dst)
    for name in RUN_TABLES:
        if (src := arts.get(run["run_id"], name)) is not None:
            shutil.copyfile(src, out_dir / name)
            written.append(out_dir / name)
    return written
