"""Report rendering: Markdown tables and the CSV rows of a `Table`."""

from __future__ import annotations

from .table import METRICS, PLUGIN_SECTIONS, SHOTS, Table, column_label


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


def plain_value(v) -> str:
    """A param value as a user writes it: 30.0 -> 30, (120.0, 160.0) -> [120, 160]."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, tuple):
        return "[" + ", ".join(plain_value(x) for x in v) + "]"
    return str(v)


def settings_table(t: Table) -> list[str]:
    """Per row, the parameters of the plugins it selected (loss, re-weighting, sampler, fine-tune
    strategy), e.g. `losses.mm: s=19, max_m=1.29, gamma=1.528`: the hyper-parameters behind each row."""
    rows = []
    for label in t.rows:
        cell = next((t.cells[(label, c)] for c in t.columns if (label, c) in t.cells), None)
        sig = cell.runs[0]["sig"] if cell and cell.runs else {}
        groups: dict = {}
        for k, v in sorted(sig.items()):
            sec, _, rest = k.partition(".")
            name, _, key = rest.partition(".")
            if sec in PLUGIN_SECTIONS and key:
                groups.setdefault(f"{sec}.{name}", []).append(f"{key}={plain_value(v)}")
        rows.append([label, "; ".join(f"{g}: {', '.join(kv)}" for g, kv in groups.items()) or "(none)"])
    return _md_table(["method", "plugin parameters"], rows)


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
