"""Issues 14.10/14.11 and 12.10: a plugin is selectable without its params section; sections are
found by their exact path."""


import yaml

from testkit import ROOT

from pipeline.checks import yaml_load
from pipeline.scaffold import add_plugin, new_loss


def test_dvc_yaml_tracks_only_keys_every_selection_has():
    """`dvc exp run -S loss=nope` (or an installed loss without a section) must reach longtail's own
    check, not DVC's "Parameters 'losses.nope' are missing": no params entry may depend on a selection."""
    params = yaml_load((ROOT / "params.yaml").read_text())
    params["loss"], params["finetune"]["strategy"] = "nope", "nope"
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("params", []):
            key = entry.replace("${loss}", "nope").replace("${finetune.strategy}", "nope")
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"dvc.yaml params entry {entry} is missing"
                node = node[part]


def test_plugins_new_checks_the_exact_path(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    new_loss("sqrt", tmp_path / "plugin", params)  # samplers.sqrt exists: it must not count
    assert yaml_load(params.read_text())["losses"]["sqrt"] == {"smoothing": 0.0}


def test_plugins_add_writes_the_build_defaults(tmp_path):
    params = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("  focal: "))
    params.write_text(text.replace(line, "  # focal"))
    key, values = add_plugin("focal", params)
    assert key == "losses.focal" and yaml_load(params.read_text())["losses"]["focal"] == values
    assert values == {"gamma": 1.0, "weighting": "reference"}  # build_focal's own defaults
    assert "# Cao et al. 2019" in params.read_text()  # the file's comments are kept
