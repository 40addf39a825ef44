"""The README states what the code does: its method table is the one method_names.yaml defines."""

import re
import shlex

import yaml

from testkit import ROOT

from pipeline.method_names import MethodNames


def test_readme_method_table_matches_method_names():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- method-table:.*?-->\n(.*?)\n<!-- /method-table -->", text, re.S)
    assert block, "README lacks the generated method table"
    assert block.group(1).strip() == MethodNames.load().markdown().strip()


def test_readme_opens_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.strip()]
    assert lines[0].startswith("# ")
    assert "pip install" in lines[1] and "longtail demo" in lines[1]
    assert "pytest" in lines[2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[2].split("&&")[-1].strip() in ci  # CI runs the README's test command


def _columns(node, prefix=""):
    """`dvc exp show`'s column names of params.yaml: nested keys joined with dots (lists are values)."""
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from _columns(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_readme_exp_show_keeps_what_a_reader_compares_and_drops_the_rest():
    """The walk-through's `dvc exp show --drop REGEX` (DVC drops the columns REGEX re.match-es): it dropped
    `dataset` ("data" matched it) and kept the slurm params and a hash column per code dependency."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "dvc exp show --drop" in x)
    argv = shlex.split(line.strip())
    drop = re.compile("|".join(argv[i + 1] for i, a in enumerate(argv) if a == "--drop"))
    params = list(_columns(yaml.safe_load((ROOT / "params.yaml").read_text())))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    deps = {d for s in stages for d in s.get("deps", [])}
    metrics = ["final.epoch", "final.top1", "final.many", "best.top1", "best.few", "epochs_evaluated",
               "shots.few", "precision"]  # metrics/eval.json
    kept = {c for c in ["Experiment", "Created", *params, *deps, *metrics] if not drop.match(c)}
    assert kept == {"Experiment", "Created", "dataset", "imbalance", "ratio", "loss", "seed", "schedule", *metrics}
