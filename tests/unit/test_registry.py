"""The registry against real package metadata: fake distributions put on sys.path."""

import resource
import subprocess
import sys

import pytest

from pipeline import registry
from pipeline.errors import LongtailError


def _fake_dist(root, name, entry_points: str, modules: dict):
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    for mod, text in modules.items():
        (root / f"{mod}.py").write_text(text)


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "goodplug", "[longtail.losses]\ngoodloss = goodmod:build\n",
               {"goodmod": "def build(class_counts, **params):\n    raise RuntimeError('not called')\n"})
    _fake_dist(tmp_path, "brokenplug",
               "[longtail.losses]\nmissingmod = no_such_module_xyz:build\nnoattr = noattrmod:build\n"
               "syntaxerr = syntaxmod:build\nraises = raisemod:build\n",
               {"noattrmod": "def other():\n    pass\n", "syntaxmod": "def build(:\n",
                "raisemod": "raise ImportError('needs a missing dependency')\ndef build(c):\n    pass\n"})
    _fake_dist(tmp_path, "clashplug", "[longtail.losses]\nce = clashmod:build\n",
               {"clashmod": "def build(class_counts):\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_registered_through_entry_points():
    names = {(p.group, p.name) for p in registry.discover()}
    assert {("losses", "ce"), ("reweighting", "cb"), ("samplers", "instance"), ("models", "resnet32")} <= names
    assert all(not p.problem for p in registry.discover() if p.dist == "longtail")


def test_broken_and_clashing_plugins_are_marked_without_import(fake_plugins):
    found = {p.name: p for p in registry.discover("losses") if p.dist in ("goodplug", "brokenplug", "clashplug")}
    assert found["goodloss"].problem == ""
    assert "is not installed" in found["missingmod"].problem
    assert "defines no 'build'" in found["noattr"].problem
    assert "does not parse" in found["syntaxerr"].problem
    assert found["raises"].problem == ""  # only a real import can tell
    assert "name clash" in found["ce"].problem
    assert "raisemod" not in sys.modules  # listing imported nothing


def test_load_errors_are_one_line(fake_plugins):
    with pytest.raises(LongtailError, match="failed to import: ImportError: needs a missing dependency"):
        registry.load("losses", "raises")
    with pytest.raises(LongtailError, match="broken: module 'no_such_module_xyz' is not installed"):
        registry.load("losses", "missingmod")
    with pytest.raises(LongtailError, match=r"unknown loss 'zzz' \(valid: .*goodloss"):
        registry.load("losses", "zzz")
    checked = {p.name: p.problem for p in registry.check_all() if p.dist == "brokenplug"}
    assert "failed to import" in checked["raises"]


def test_build_reports_bad_parameters(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "paramplug", "[longtail.losses]\nparamloss = parammod:build\n",
               {"parammod": "def build(class_counts, *, gamma=1.0):\n    return gamma\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.build("losses", "paramloss", [1, 2], params={"gamma": 2.0}) == 2.0
    with pytest.raises(LongtailError, match=r"unknown key losses.paramloss.gama in params.yaml \(did you mean losses.paramloss.gamma\?\)"):
        registry.build("losses", "paramloss", [1, 2], params={"gama": 2.0}, param_key="losses.paramloss")


def test_cli_plugins_list_is_fast_and_torch_free():
    code = ("import sys, time; t = time.time(); sys.argv = ['longtail', 'plugins', 'list'];\n"
            "from pipeline.cli import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr
    assert "resnet32" in out.stdout
    # the child's own CPU time (wall time depends on what else runs: the tests run in parallel);
    # importing torch alone costs about 4 s of it
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 5
