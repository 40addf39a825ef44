"""`longtail demo`: the whole pipeline as one DVC experiment on the embedded digits data, run from the
committed params.yaml with only the demo's own overrides, then a compact summary of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import yaml

from . import tools
from .checks import yaml_file, yaml_text
from .data import profile_label
from .errors import LongtailError
from .method_names import flatten

DURATION = "about 2 minutes on 2 CPU cores"  # the README says the same (a test checks)
OVERRIDES = ["dataset=digits"]
# DVC prints this once per cached output when the experiment's baseline has no dvc.lock yet (a fresh
# checkout): harmless, the stage then produces the output.
NOISE = re.compile(r"No file hash info found for .* It won't be created\.")


def _value(v) -> str:
    """A value as `dvc exp run -S key=VALUE` parses it (YAML flow style)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def restore_args(committed: dict, workspace: dict) -> list[str]:
    """`-S` overrides that turn the workspace's params.yaml back into the committed one."""
    old, new = flatten(committed or {}), flatten(workspace or {})
    out = [f"{k}={_value(v)}" for k, v in old.items() if k not in new or new[k] != v]
    out += [f"~{k}" for k in new if k not in old]
    return out


def digits_overrides(committed: dict) -> list[str]:
    """What an image-folder setting of the committed params must become for the digits (8x8, one size)."""
    data = committed.get("data")
    size = data.get("image_size", "auto") if isinstance(data, dict) else "auto"
    return [] if size in ("auto", None) else ["data.image_size=auto"]


def committed_params(path: str = "params.yaml") -> dict:
    tools.require("git")
    res = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    if res.returncode != 0:
        raise LongtailError("longtail demo runs a DVC experiment, which needs a git repository with params.yaml "
                            "committed: run it in a clone of the project (or `git init && git add -A && "
                            "git commit -m init` first)")
    return yaml_text(res.stdout, f"the committed {path}") or {}


def user_sets(extra: list[str]) -> list[str]:
    """The KEY=VALUE of each -S / --set-param among the `dvc exp run` arguments (of params.yaml; another
    params file's are left to DVC)."""
    out, args = [], iter(extra)
    for a in args:
        if a in ("-S", "--set-param"):
            value = next(args, "")
        elif a.startswith("--set-param="):
            value = a.partition("=")[2]
        elif a.startswith("-S"):
            value = a[2:]
        else:
            continue
        file, sep, rest = value.partition(":")
        if not sep or "=" in file:
            out.append(value)
        elif file == "params.yaml":
            out.append(rest)
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def summary(rows: list[dict]) -> str:
    """The demo's own table: narrow enough for 80 columns, plain text for pipes."""
    head = ["method", "final top-1", "best top-1 (epoch)", "many / medium / few"]
    body = [[r["method"], f"{_pct(r.get('final_top1'))}%",
             f"{_pct(r.get('best_top1'))}% ({int(r['best_epoch']) if r.get('best_epoch') is not None else '?'})",
             " / ".join(_pct(r.get(f"final_{g}")) for g in ("many", "medium", "few"))] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head)] + [fmt(b) for b in body])


def ui_link(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The runs table of an experiment in MLflow 3's "Model training" view (it opens in GenAI mode otherwise)."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _run_filtered(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        if not NOISE.search(line):
            sys.stderr.write(line)
    return proc.wait()


def run(extra: list[str], temp: bool, echo) -> int:
    if not os.path.exists("params.yaml"):
        raise LongtailError("params.yaml not found: run `longtail demo` at the project root")
    tools.require("dvc")
    workspace = yaml_file("params.yaml", "params file params.yaml") or {}
    committed = committed_params()
    restore = restore_args(committed, workspace)
    overrides = OVERRIDES + digits_overrides(committed)
    mine = user_sets(extra)
    if mine:  # checked as `longtail sweep` checks them, before DVC runs anything
        from .sweep import check_sets, parse_set

        check_sets(committed, parse_set(overrides + mine))
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    sets = [a for kv in restore + overrides for a in ("-S", kv)]
    cmd = ["dvc", "exp", "run", "-n", name, *sets, *(["--temp"] if temp else []), *extra]
    if restore:
        echo(f"demo: params.yaml differs from the committed one in {len(restore)} key(s); the demo runs the "
             f"committed params ({', '.join(restore)})", err=True)
    echo("$ " + " ".join(cmd), err=True)
    rc = _run_filtered(cmd)
    if rc != 0:
        return rc
    from .params import experiment_name
    from .tracking import parent_summary

    row = parent_summary(name, experiment_name(committed))  # the demo ran the committed params
    if row is None:
        echo(f"demo: experiment {name} finished (not tracked in MLflow; see `dvc exp show`)", err=True)
        return 0
    echo(f"\ndemo: experiment {name} ran {row['method']} on {row['dataset']} "
         f"({profile_label(row['imbalance'], row['ratio'])}, seed {row['seed']})\n")
    echo(summary([row]))
    echo(f"\nnext: mlflow ui --backend-store-uri sqlite:///mlflow.db, then open {ui_link(row['experiment_id'])} "
         "(the runs table of MLflow's 'Model training' view); dvc exp show; longtail report", err=True)
    return 0
