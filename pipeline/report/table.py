"""Report tables: name, filter, group and de-duplicate evaluate runs into cells (method x setting)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import LongtailError
from ..params import OPTIONAL
from ..method_names import PHASE_LABELS, MethodNames, _matches, norm
from ..data import DATASETS, IMBALANCES, SOURCE_PROFILE

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



def column_of(params: dict) -> tuple:
    if str(params.get("imbalance")) == SOURCE_PROFILE:  # no ratio of its own: the source's counts
        return (str(params.get("dataset")), SOURCE_PROFILE, "")
    ratio = norm(params.get("ratio"))
    return (str(params.get("dataset")), str(params.get("imbalance")), ratio if isinstance(ratio, float) else str(ratio))


def column_label(col: tuple) -> str:
    ds, prof, ratio = col
    return f"{ds} {prof} {ratio:g}" if isinstance(ratio, float) else " ".join(t for t in (ds, prof, ratio) if t)


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
    common: dict = field(default_factory=dict)  # param -> the value rows without a [bracket] for it have


def _seed(params: dict):
    s = norm(params.get("seed"))
    return int(s) if isinstance(s, float) else s


def _where_ok(run: dict, where: list[tuple]) -> bool:
    for key, value, equal in where:
        have = run["method"] if key == "method" else run["params"].get(key, run["tags"].get(key))
        if (norm(have) == norm(value)) != equal:
            return False
    return True


def parse_where(items) -> list[tuple]:
    """--where KEY=VALUE keeps the runs that have it, KEY!=VALUE the runs that do not (e.g. leave out one
    run: longtail.dvc_exp!=NAME): (key, value, equal) each."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        equal = not key.endswith("!")
        key = key.removesuffix("!").strip()
        if not sep or not key:
            raise LongtailError(f"--where takes KEY=VALUE or KEY!=VALUE (a param, a tag or 'method'), got {item!r}")
        out.append((key, value.strip(), equal))
    return out


def _check_where_keys(runs: list[dict], where: list[tuple]) -> None:
    """A --where key that no run has (a param, a tag or 'method') is a typo, not a filter that matched
    nothing: name it and the closest key the runs have."""
    import difflib

    if not runs:
        return
    known = {"method"} | {k for r in runs for k in (*r["params"], *r["tags"])}
    for key, _, _ in where:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else "a param, a tag or 'method' of the runs"
            raise LongtailError(f"--where {key}: no run in the store has the key {key!r} ({hint})")


def build_table(runs: list[dict], names: MethodNames | None = None, where=(), ignore=()) -> Table:
    """Name, filter, group and de-duplicate evaluate runs into cells (seed duplicates: the latest run wins)."""
    names = names or MethodNames.load()
    every = []
    for r in runs:
        params = {**OPTIONAL, **r.get("params", {})}  # a run from before a key existed had its default
        if not all(k in params for k in AXES):
            continue
        every.append({**r, "params": params, "tags": r.get("tags", {}), "metrics": r.get("metrics", {}),
                      "method": names.name(params), "column": column_of(params), "seed": _seed(params),
                      "sig": {k: norm(v) for k, v in signature(params, ignore).items()}})
    _check_where_keys(every, where)
    enriched = [run for run in every if _where_ok(run, where)]
    common = common_settings(enriched, names)
    by_method = defaultdict(list)
    for r in enriched:
        by_method[r["method"]].append(r)
    for method, rs in by_method.items():
        own = defining_keys(names, method)
        keys = sorted({k for r in rs for k in r["sig"]} | set(common))
        varying = {k for k in keys if len({r["sig"].get(k) for r in rs}) > 1}
        for r in rs:
            shown = [k for k in keys if k not in own and (k in varying or (k in r["sig"] and r["sig"][k] != common.get(k)))]
            r["differs"] = shown  # what the header's common settings must state
            if method not in names.names:  # a fallback name: also the params that set its loss's named methods apart
                shown = sorted(set(shown) | {k for k in names.pinned(r["params"].get("loss")) if k in r["params"]})
            detail = ", ".join(f"{k}={r['params'].get(k, '-')}" for k in shown)
            r["label"] = f"{method} [{detail}]" if shown else method
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
    used = [r for c in cells.values() for r in c.runs]
    stated = sorted({k for r in used for k in r["differs"]})
    return Table(cells, rows, columns, used, {k: common[k] for k in stated if k in common})


def defining_keys(names: MethodNames, method: str) -> set:
    """The params a method's name already says (loss, re-balancing, ...): never repeated in its label."""
    try:
        return set(names.full(method))
    except LongtailError:  # a fallback name: the loss and the re-balancing choices
        return {"loss", *PHASE_LABELS}


def common_settings(runs: list[dict], names: MethodNames) -> dict:
    """The table's common settings: per param (besides those naming a method), the value most runs have
    (among the runs that have the param). A row states every param in which it differs from these."""
    from collections import Counter

    counts: dict = defaultdict(Counter)
    for r in sorted(runs, key=lambda r: r.get("start_time") or 0):
        own = defining_keys(names, r["method"])
        for k, v in r["sig"].items():
            if k not in own:
                counts[k][repr(v)] += 1
    values = {}
    for k, c in counts.items():
        best = c.most_common(1)[0][0]
        values[k] = next(r["sig"][k] for r in runs if k in r["sig"] and repr(r["sig"][k]) == best)
    return values


def cells_method(cells: dict, label: str) -> str:
    return next(c.method for c in cells.values() if c.label == label)
