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


def test_plugins_new_checks_the_params_file_and_name_before_writing_anything(tmp_path):
    """Fault-injection pass: `-p` naming a YAML list gave an AttributeError after the package was written;
    Python keywords were accepted as plugin names."""
    import pytest

    from pipeline.errors import LongtailError

    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(LongtailError, match=r"params file .*list.yaml must be a mapping of keys, got a list"):
        new_loss("my_loss", tmp_path / "plugin", bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("losses: [1, 2]\n")
    with pytest.raises(LongtailError, match=r"losses must be a mapping of plugin name -> parameters"):
        new_loss("my_loss", tmp_path / "plugin", broken)
    for keyword in ("class", "import"):
        with pytest.raises(LongtailError, match="not a keyword"):
            new_loss(keyword, tmp_path / "plugin", None)
    assert not (tmp_path / "plugin").exists()


def test_a_scaffolded_but_uninstalled_plugins_section_says_to_install_it(default_params):
    """`longtail plugins new focal2` writes losses.focal2; until it is installed the check names both readings."""
    import pytest

    from pipeline.errors import LongtailError
    from pipeline.params import parse

    raw = {**default_params, "losses": {**default_params["losses"], "focal2": {"smoothing": 0.0}}}
    with pytest.raises(LongtailError, match=r"unknown key losses.focal2 .*did you mean losses.focal.*install it "
                                            r"first: pip install -e <its folder>"):
        parse(raw)
