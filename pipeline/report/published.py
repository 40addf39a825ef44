"""The published figures (pipeline/published.yaml) next to ours, with the difference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checks import yaml_load
from ..errors import LongtailError
from .render import _md_table
from .table import Table, column_label

PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "published.yaml"


@dataclass
class Published:
    sources: dict  # key -> citation
    figures: list  # [{method, setting, error, source, given}]

    @classmethod
    def load(cls, path: Path = PUBLISHED_FILE) -> "Published":
        raw = yaml_load(Path(path).read_text())
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


def parse_published_as(pairs) -> dict:
    """`--published-as imagefolder=cifar10` -> {"imagefolder": "cifar10"}: runs of the dataset on the left
    are compared with the published figures of the one on the right (e.g. the CIFAR-10 images as a folder)."""
    out = {}
    known = sorted({setting.split()[0] for setting in Published.load().settings}) if pairs else []
    for pair in pairs or ():
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise LongtailError(f"--published-as wants OURS=PUBLISHED dataset names, e.g. imagefolder=cifar10, "
                                f"got {pair!r}")
        if theirs.strip() not in known:
            raise LongtailError(f"--published-as {pair}: there are no published figures of {theirs.strip()!r} "
                                f"(valid: {', '.join(known)})")
        out[ours.strip()] = theirs.strip()
    return out


def published_setting(col: tuple, published_as: dict | None = None) -> str:
    """The published setting a table column is compared with ("<dataset> <profile> <ratio>")."""
    ds, prof, ratio = col
    return column_label(((published_as or {}).get(ds, ds), prof, ratio))


def compare_published(t: Table, pub: Published, published_as: dict | None = None) -> list[dict]:
    """One row per (our row, setting) that has a published figure: ours (best and final epoch) and the difference.
    `published_as` maps our dataset names to published ones (parse_published_as)."""
    look = pub.lookup()
    out = []
    for label in t.rows:
        for col in t.columns:
            cell = t.cells.get((label, col))
            fig = look.get((cell.method, published_setting(col, published_as))) if cell else None
            if fig is None:
                continue
            best, best_std, n = cell.stat("best_error")
            final, final_std, _ = cell.stat("final_error")
            out.append({"method": cell.method, "label": label, "setting": published_setting(col, published_as),
                        "ours_setting": column_label(col), "n": n,
                        "ours_best": best, "ours_best_std": best_std, "ours_final": final,
                        "ours_final_std": final_std, "published": fig["error"],
                        "diff_best": None if best is None else best - fig["error"],
                        "diff_final": None if final is None else final - fig["error"],
                        "source": fig["source"]})
    return out


def published_markdown(t: Table, pub: Published, rows: list[dict], published_as: dict | None = None) -> list[str]:
    lines = ["## Against the published figures", ""]
    if published_as:
        lines += ["Compared as: " + ", ".join(f"our {a} runs with the published {b} figures"
                                              for a, b in published_as.items()) + " (`--published-as`).", ""]
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
