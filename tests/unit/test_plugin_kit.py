"""The public plugin kit: the MM package and the `plugins new` template import only from it, and
what they import works."""

import ast
import importlib.util
import sys
from pathlib import Path

from testkit import ROOT

from pipeline import plugin_kit
from pipeline.scaffold import new_loss


def pipeline_imports(path: Path) -> set[str]:
    """The `pipeline` modules a source file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
    return found


def test_kit_exports():
    for name in plugin_kit.__all__:
        assert hasattr(plugin_kit, name), name
    assert plugin_kit.EXTRA_INPUTS == ("features", "weight")


def test_mm_plugin_imports_only_the_kit():
    files = sorted((ROOT / "plugins" / "longtail-mm").rglob("*.py"))
    assert files
    for f in files:
        assert pipeline_imports(f) <= {"pipeline.plugin_kit"}, f


def test_scaffold_imports_only_the_kit_and_passes_its_contract(tmp_path, monkeypatch):
    dest = new_loss("kit_probe", tmp_path / "longtail-kit-probe")
    for f in dest.rglob("*.py"):
        assert pipeline_imports(f) <= {"pipeline.plugin_kit"}, f
    spec = importlib.util.spec_from_file_location("kit_probe_loss", dest / "src" / "longtail_kit_probe" / "loss.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kit_probe_loss", module)
    spec.loader.exec_module(module)
    plugin_kit.check_loss_plugin(module.build, params={"smoothing": 0.1})
