"""`longtail report`: the paper's tables and figures, generated from the finished runs in the MLflow
store (every evaluate run: workspace, `dvc exp run --temp` and queued experiments alike).

- Rows are methods, named from their params by pipeline/method_names.yaml; columns are settings
  (dataset x profile x ratio); a cell aggregates the seeds of one configuration: mean, sample
  standard deviation (ddof = 1) and n. Runs that differ in any other param that changes what a run
  measures (epochs, lr, loss params, ...) get separate rows, labelled with the differing params.
- Both the best-epoch error (what the LDAM-DRW line of papers reports) and the final-epoch error,
  and the many / medium / few-shot accuracy.
- Optionally the published figures (pipeline/published.yaml) next to ours, with the difference.
- Figures: per-class error of chosen methods (classes by training count), per-class margins, and
  each run's own figures (curves, confusion, per-class accuracy vs count, margins).

Everything here works on plain dicts (as `tracking.finished_runs` returns them), so the maths is
testable without MLflow."""

from __future__ import annotations

import csv
import re
import shutil
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DATASETS, IMBALANCES
from .errors import LongtailError

HERE = Path(__file__).resolve().parent
METHODS_FILE = HERE / "method_names.yaml"
PUBLISHED_FILE = HERE / "published.yaml"

DATASET_ORDER, PROFILE_ORDER = DATASETS, IMBALANCES
# evaluate-run metrics (fractions in MLflow; percentages in the report)
METRICS = ("best_error", "final_error", "best_top1", "final_top1", "final_many", "final_medium", "final_few",
           "best_many", "best_medium", "best_few")
SHOTS = ("many", "medium", "few")
AXES = ("dataset", "imbalance", "ratio")
# params that do not change what a run measures, besides the table's axes and the seed
IGNORED = ("seed", "data.root", "train.device", "train.eval_batch_size", "train.checkpoint_every", "tracking",
           "resolved")
# plugin parameter sections: only the section of the selected plugin matters
PLUGIN_SECTIONS = {"losses": ("loss",), "reweightings": ("train.reweighting", "finetune.reweighting"),
                   "samplers": ("train.sampler", "finetune.sampler"), "finetunes": ("finetune.strategy",)}
PHASE_LABELS = {"train.reweighting": "RW", "train.sampler": "RS", "finetune.reweighting": "DRW",
                "finetune.sampler": "DRS", "finetune.strategy": "FT"}


def norm(value):
    """A param value as comparable data: MLflow logs strings ("100", "True", "cb"), YAML gives typed values."""
    if isinstance(value, str):
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if not isinstance(loaded, (bool, int, float, list)) and loaded is not None:
            return value
        value = loaded
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(norm(v) for v in value)
    return value


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in prefixes)


# ------------------------------------------------------------------------------------------- names

@dataclass
class MethodNames:
    plain: dict
    defaults: dict
    methods: list  # [{name, params, about}]

    @classmethod
    def load(cls, path: Path = METHODS_FILE) -> "MethodNames":
        raw = yaml.safe_load(Path(path).read_text())
        return cls(dict(raw.get("plain") or {}), dict(raw.get("defaults") or {}), list(raw.get("methods") or []))

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.methods]

    def full(self, name: str) -> dict:
        """Every param a method fixes (the plain re-balancing values filled in)."""
        for m in self.methods:
            if m["name"] == name:
                return {**self.plain, **m["params"]}
        raise LongtailError(f"unknown method {name!r} (valid: {', '.join(self.names)})")

    def _get(self, params: dict, key: str):
        return params[key] if key in params else self.defaults.get(key)

    def name(self, params: dict) -> str:
        for m in self.methods:
            if all(norm(self._get(params, k)) == norm(v) for k, v in {**self.plain, **m["params"]}.items()):
                return m["name"]
        return self.fallback(params)

    def fallback(self, params: dict) -> str:
        """loss+RW:x+RS:y+DRW:z+DRS:w: the loss and every re-balancing choice that is not the plain one."""
        parts = [str(self._get(params, "loss") or "?")]
        for key, short in PHASE_LABELS.items():
            v = self._get(params, key)
            if v is not None and norm(v) != norm(self.plain.get(key)):
                parts.append(f"{short}:{v}")
        return "+".join(parts)

    def markdown(self) -> str:
        """The README's method table."""
        lines = ["| method | params (besides no re-balancing) | what |", "|---|---|---|"]
        for m in self.methods:
            ps = ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in m["params"].items())
            lines.append(f"| {m['name']} | {ps} | {m.get('about', '')} |")
        return "\n".join(lines)


def _yaml_value(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


# ------------------------------------------------------------------------------------------ cells

def column_of(params: dict) -> tuple:
    ratio = norm(params.get("ratio"))
    return (str(params.get("dataset")), str(params.get("imbalance")), ratio if isinstance(ratio, float) else str(ratio))


def column_label(col: tuple) -> str:
    ds, prof, ratio = col
    return f"{ds} {prof} {ratio:g}" if isinstance(ratio, float) else f"{ds} {prof} {ratio}"


def column_key(col: tuple):
    ds, prof, ratio = col
    return (DATASET_ORDER.index(ds) if ds in DATASET_ORDER else len(DATASET_ORDER), ds,
            PROFILE_ORDER.index(prof) if prof in PROFILE_ORDER else len(PROFILE_ORDER), prof,
            -ratio if isinstance(ratio, float) else 0)


def signature(params: dict, ignore=()) -> dict:
    """The params that decide what a run measures, besides the table's axes and the seed."""
    used = {sec: {str(params.get(k)) for k in keys} for sec, keys in PLUGIN_SECTIONS.items()}
    out = {}
    for k, v in params.items():
        if k in AXES or _matches(k, IGNORED) or _matches(k, ignore):
            continue
        sec, _, rest = k.partition(".")
        if sec in PLUGIN_SECTIONS and rest and rest.split(".")[0] not in used[sec]:
            continue
        out[k] = v
    return out


def summarize(values) -> tuple:
    """(mean, sample std or None for one value, n); (None, None, 0) for no values."""
    values = [float(v) for v in values]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


@dataclass
class Cell:
    label: str
    method: str
    column: tuple
    runs: list = field(default_factory=list)  # one per seed, by seed
    replaced: int = 0  # older runs of an already-seen seed that were left out

    @property
    def seeds(self) -> list:
        return [r["seed"] for r in self.runs]

    def stat(self, metric: str, scale: float = 100.0) -> tuple:
        return summarize([scale * r["metrics"][metric] for r in self.runs if metric in r["metrics"]])

    def class_values(self, kind: str = "final") -> dict[int, list[float]]:
        """class index -> per-seed accuracies from the class_acc_<kind>/NNN metrics."""
        out = defaultdict(list)
        for r in self.runs:
            for k, v in r["metrics"].items():
                if k.startswith(f"class_acc_{kind}/"):
                    out[int(k.split("/", 1)[1])].append(v)
        return dict(out)


@dataclass
class Table:
    cells: dict  # (label, column) -> Cell
    rows: list  # labels in order
    columns: list  # columns in order
    runs: list  # every run used


def _seed(params: dict):
    s = norm(params.get("seed"))
    return int(s) if isinstance(s, float) else s


def _where_ok(run: dict, where: list[tuple]) -> bool:
    for key, value in where:
        have = run["method"] if key == "method" else run["params"].get(key, run["tags"].get(key))
        if norm(have) != norm(value):
            return False
    return True


def parse_where(items) -> list[tuple]:
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LongtailError(f"--where takes KEY=VALUE (a param, a tag or 'method'), got {item!r}")
        out.append((key.strip(), value.strip()))
    return out


def build_table(runs: list[dict], names: MethodNames | None = None, where=(), ignore=()) -> Table:
    """Name, filter, group and de-duplicate evaluate runs into cells (seed duplicates: the latest run wins)."""
    names = names or MethodNames.load()
    enriched = []
    for r in runs:
        params = r.get("params", {})
        if not all(k in params for k in AXES):
            continue
        run = {**r, "tags": r.get("tags", {}), "metrics": r.get("metrics", {}), "method": names.name(params),
               "column": column_of(params), "seed": _seed(params),
               "sig": {k: norm(v) for k, v in signature(params, ignore).items()}}
        if _where_ok(run, where):
            enriched.append(run)
    by_method = defaultdict(list)
    for r in enriched:
        by_method[r["method"]].append(r)
    for method, rs in by_method.items():
        keys = sorted({k for r in rs for k in r["sig"]})
        varying = [k for k in keys if len({r["sig"].get(k) for r in rs}) > 1]
        for r in rs:
            detail = ", ".join(f"{k}={r['params'].get(k, '-')}" for k in varying)
            r["label"] = f"{method} [{detail}]" if varying else method
    cells: dict = {}
    for r in sorted(enriched, key=lambda r: r.get("start_time") or 0, reverse=True):  # newest first
        cell = cells.setdefault((r["label"], r["column"]), Cell(r["label"], r["method"], r["column"]))
        if r["seed"] in cell.seeds:
            cell.replaced += 1
        else:
            cell.runs.append(r)
    for cell in cells.values():
        cell.runs.sort(key=lambda r: (str(type(r["seed"])), r["seed"]))
    order = {n: i for i, n in enumerate(names.names)}
    rows = sorted({c.label for c in cells.values()},
                  key=lambda lbl: (order.get(cells_method(cells, lbl), len(order)), lbl))
    columns = sorted({c.column for c in cells.values()}, key=column_key)
    return Table(cells, rows, columns, [r for c in cells.values() for r in c.runs])


def cells_method(cells: dict, label: str) -> str:
    return next(c.method for c in cells.values() if c.label == label)


# ---------------------------------------------------------------------------------------- render

def fmt_stat(mean, std, n, digits: int = 2, with_n: bool = True) -> str:
    if n == 0 or mean is None:
        return "—"
    s = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return s + (f" (n={n})" if with_n else "")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(s):
        return str(s).replace("|", "\\|")

    return (["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows])


def error_table(t: Table, which: str) -> list[str]:
    rows = []
    for label in t.rows:
        row = [label]
        for col in t.columns:
            cell = t.cells.get((label, col))
            row.append(fmt_stat(*cell.stat(f"{which}_error")) if cell else "—")
        rows.append(row)
    return _md_table(["method"] + [column_label(c) for c in t.columns], rows)


def shots_table(t: Table, which: str = "final") -> list[str]:
    rows = []
    for label in t.rows:
        row = [label]
        for col in t.columns:
            cell = t.cells.get((label, col))
            if cell is None:
                row.append("—")
                continue
            parts = [fmt_stat(cell.stat(f"{which}_{g}")[0], None, len(cell.runs), digits=1, with_n=False)
                     for g in SHOTS]
            row.append(" / ".join(p if p != "—" else "n/a" for p in parts) + f" (n={len(cell.runs)})")
        rows.append(row)
    return _md_table(["method"] + [column_label(c) for c in t.columns], rows)


def csv_rows(t: Table) -> tuple[list[str], list[list]]:
    header = ["method", "label", "dataset", "imbalance", "ratio", "n", "seeds"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    header += ["groups", "run_ids"]
    rows = []
    for label in t.rows:
        for col in t.columns:
            cell = t.cells.get((label, col))
            if cell is None:
                continue
            row = [cell.method, label, *col[:2], f"{col[2]:g}" if isinstance(col[2], float) else col[2],
                   len(cell.runs), " ".join(map(str, cell.seeds))]
            for m in METRICS:
                mean, std, n = cell.stat(m)
                row += ["" if mean is None else round(mean, 4), "" if std is None else round(std, 4), n]
            row += [" ".join(r.get("group", "") for r in cell.runs), " ".join(r.get("run_id", "") for r in cell.runs)]
            rows.append(row)
    return header, rows


def write_csv(path: Path, header, rows) -> None:
    from . import io

    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------------- published

@dataclass
class Published:
    sources: dict  # key -> citation
    figures: list  # [{method, setting, error, source, given}]

    @classmethod
    def load(cls, path: Path = PUBLISHED_FILE) -> "Published":
        raw = yaml.safe_load(Path(path).read_text())
        sources = dict(raw.get("sources") or {})
        figures = []
        for entry in raw.get("figures") or []:
            if entry["source"] not in sources:
                raise LongtailError(f"{path}: figure of {entry['method']} cites unknown source {entry['source']!r}")
            for kind in ("error", "accuracy"):
                for setting, v in (entry.get(kind) or {}).items():
                    figures.append({"method": entry["method"], "setting": setting, "source": entry["source"],
                                    "error": round(float(v) if kind == "error" else 100.0 - float(v), 4),
                                    "given": kind})
        return cls(sources, figures)

    def lookup(self) -> dict:
        """(method, setting) -> the first figure listed for it."""
        out = {}
        for f in self.figures:
            out.setdefault((f["method"], f["setting"]), f)
        return out

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(f["setting"] for f in self.figures))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(f["method"] for f in self.figures))


def compare_published(t: Table, pub: Published) -> list[dict]:
    """One row per (our row, setting) that has a published figure: ours (best and final epoch) and the difference."""
    look = pub.lookup()
    out = []
    for label in t.rows:
        for col in t.columns:
            cell = t.cells.get((label, col))
            fig = look.get((cell.method, column_label(col))) if cell else None
            if fig is None:
                continue
            best, best_std, n = cell.stat("best_error")
            final, final_std, _ = cell.stat("final_error")
            out.append({"method": cell.method, "label": label, "setting": column_label(col), "n": n,
                        "ours_best": best, "ours_best_std": best_std, "ours_final": final,
                        "ours_final_std": final_std, "published": fig["error"],
                        "diff_best": None if best is None else best - fig["error"],
                        "diff_final": None if final is None else final - fig["error"],
                        "source": fig["source"]})
    return out


def published_markdown(t: Table, pub: Published, rows: list[dict]) -> list[str]:
    lines = ["## Against the published figures", ""]
    if rows:
        settings = [s for s in pub.settings if any(r["setting"] == s for r in rows)]
        labels = [lbl for lbl in t.rows if any(r["label"] == lbl for r in rows)]
        by = {(r["label"], r["setting"]): r for r in rows}
        body = []
        for lbl in labels:
            line = [lbl]
            for s in settings:
                r = by.get((lbl, s))
                line.append("—" if r is None or r["ours_best"] is None else
                            f"{r['ours_best']:.2f} vs {r['published']:.2f} ({r['diff_best']:+.2f})")
            body.append(line)
        lines += ["Top-1 error (%): ours (best epoch, mean over seeds) vs published (difference, ours − published).",
                  ""] + _md_table(["method"] + settings, body) + [""]
    else:
        lines += ["None of these runs is in a published setting with a published figure for its method.", ""]
    look = pub.lookup()
    lines += ["Published top-1 error (%) (figures given as accuracy are shown as 100 − accuracy):", ""]
    body = [[m] + [(f"{look[(m, s)]['error']:.2f}" if (m, s) in look else "—") for s in pub.settings]
            for m in pub.methods]
    lines += _md_table(["method"] + pub.settings, body) + ["", "Sources:", ""]
    for key, citation in pub.sources.items():
        methods = sorted({f["method"] for f in pub.figures if f["source"] == key})
        lines.append(f"- {', '.join(methods)}: {citation}")
    return lines + [""]


# --------------------------------------------------------------------------------------- figures

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
    from . import figures

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
    from . import figures

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


def run_figures(run: dict, arts: Artifacts, out_dir: Path) -> list[Path]:
    """One run's figures: the PNGs its evaluate stage logged; the newer ones are re-drawn from its CSVs
    when the run predates them."""
    from . import figures

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
    return written


# ------------------------------------------------------------------------------------------ main

def generate(runs: list[dict], out: Path, *, fetch=None, published: bool = False, compare: list[str] | None = None,
             per_run: str = "first", where=(), ignore=(), source: str = "") -> dict:
    """Write table.md, table.csv (and published.csv, figures/, runs/) under `out`; return a summary."""
    if per_run not in ("first", "all", "none"):
        raise LongtailError(f"--runs must be one of first, all, none, got {per_run!r}")
    names = MethodNames.load()
    t = build_table(runs, names, where=where, ignore=ignore)
    if not t.cells:
        raise LongtailError(f"no finished evaluate runs{' match --where' if where else ''} in {source or 'the store'}: "
                            "run experiments first (e.g. `longtail sweep --loss ce,ldam --run`)")
    out.mkdir(parents=True, exist_ok=True)
    n_runs = len(t.runs)
    replaced = sum(c.replaced for c in t.cells.values())
    md = ["# Results", "",
          f"Generated by `longtail report` from {source or 'the MLflow store'}: {n_runs} evaluate runs, "
          f"{len(t.rows)} rows, {len(t.columns)} settings (dataset, profile, imbalance ratio).",
          "Cells: mean ± sample standard deviation over seeds, n = number of seeds (one seed: the value alone)."
          + (f" {replaced} older re-run(s) of a seed were left out (the newest counts)." if replaced else ""),
          "Rows are named by pipeline/method_names.yaml; a [bracket] names the params that tell apart "
          "runs of the same method.", "",
          "## Top-1 error (%), best epoch", "",
          "The best test accuracy over the evaluated epochs: what the LDAM-DRW line of papers reports (optimistic).",
          ""] + error_table(t, "best") + ["", "## Top-1 error (%), final epoch", ""] + error_table(t, "final") + [
          "", "## Many / medium / few-shot accuracy (%), final epoch", "",
          "Classes with > 100 / 20..100 / < 20 training images; mean over seeds.", ""] + shots_table(t) + [""]
    header, rows = csv_rows(t)
    write_csv(out / "table.csv", header, rows)
    written = [out / "table.csv"]
    if published:
        pub = Published.load()
        prow = compare_published(t, pub)
        md += published_markdown(t, pub, prow)
        cols = ["method", "label", "setting", "n", "ours_best", "ours_best_std", "ours_final", "ours_final_std",
                "published", "diff_best", "diff_final", "source"]
        write_csv(out / "published.csv", cols,
                  [[("" if r[c] is None else round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in cols]
                   for r in prow])
        written.append(out / "published.csv")
    figs: list[Path] = []
    run_dirs: list[tuple] = []
    if fetch is not None:
        arts = Artifacts(fetch)
        try:
            if compare:
                figs += compare_figures(t, compare, arts, out / "figures")
            figs += margin_figures(t, arts, out / "figures")
            if per_run != "none":
                used: set = set()
                for label in t.rows:
                    for col in t.columns:
                        cell = t.cells.get((label, col))
                        for run in (cell.runs if per_run == "all" else cell.runs[:1]) if cell else []:
                            name = slug(run.get("group") or run["run_id"]) or run["run_id"]
                            if name in used:
                                name = f"{name}-{run['run_id'][:8]}"
                            used.add(name)
                            files = run_figures(run, arts, out / "runs" / name)
                            run_dirs.append((label, column_label(col), run, name, files))
                            figs += files
        finally:
            arts.close()
    if figs:
        md += ["## Figures", ""]
        for p in figs:
            if p.parent == out / "figures":
                md.append(f"- [{p.name}]({p.relative_to(out).as_posix()})")
        if run_dirs:
            md += ["", "Per run (training curves with the fine-tune start, confusion matrix, per-class accuracy, "
                       "accuracy vs training count, per-class margins):", ""]
            md += _md_table(["method", "setting", "seed", "run", "figures"],
                            [[lbl, col, run["seed"], run.get("group", ""),
                              " ".join(f"[{f.stem}]({f.relative_to(out).as_posix()})" for f in files)]
                             for lbl, col, run, name, files in run_dirs])
        md.append("")
    from . import io

    with io.atomic_path(out / "table.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    written.insert(0, out / "table.md")
    return {"table": t, "written": written + figs, "markdown": "\n".join(md)}

