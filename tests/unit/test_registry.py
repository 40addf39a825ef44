"""The registry against real package metadata: fake distributions put on sys.path."""

import resource
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import yaml

from testkit.plugins import fake_dist

from pipeline import registry
from pipeline.errors import LongtailError


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    fake_dist(tmp_path, "goodplug", "[longtail.losses]\ngoodloss = goodmod:build\n",
              {"goodmod": "def build(class_counts, **params):\n    raise RuntimeError('not called')\n"})
    fake_dist(tmp_path, "brokenplug",
              "[longtail.losses]\nmissingmod = no_such_module_xyz:build\nnoattr = noattrmod:build\n"
              "syntaxerr = syntaxmod:build\nraises = raisemod:build\n",
              {"noattrmod": "def other():\n    pass\n", "syntaxmod": "def build(:\n",
               "raisemod": "raise ImportError('needs a missing dependency')\ndef build(c):\n    pass\n"})
    fake_dist(tmp_path, "clashplug", "[longtail.losses]\nce = clashmod:build\n",
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
    fake_dist(tmp_path, "paramplug", "[longtail.losses]\nparamloss = parammod:build\n",
              {"parammod": "from types import SimpleNamespace\n\n\ndef build(class_counts, *, gamma=1.0):\n"
                           "    return SimpleNamespace(head='linear', gamma=gamma)\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.build("losses", "paramloss", [1, 2], params={"gamma": 2.0}).gamma == 2.0
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


@pytest.fixture
def faulty_plugins(tmp_path, monkeypatch, default_params):
    """Plugins that fail only when run: a package whose __init__ raises, a build that raises, a build
    that is not callable; and one that checks its own params. params.yaml here selects ce."""
    (tmp_path / "brokenpkg").mkdir()
    fake_dist(tmp_path, "faultplug",
              "[longtail.losses]\nbrokenloss = brokenpkg.loss:build\nnotthere = brokenpkg.loss:nothere\n"
              "nomod = brokenpkg.nomod:build\nvalerr = oddmod:build_valerr\nnotcall = oddmod:build\n"
              "strict = oddmod:build_strict\n",
              {"brokenpkg/__init__": "raise RuntimeError('brokenpkg needs CUDA 13')\n",
               "brokenpkg/loss": "def build(class_counts):\n    pass\n",
               "oddmod": "from pipeline.plugin_kit import check_number\n\nbuild = 5\n\n\n"
                         "def build_valerr(class_counts):\n    raise ValueError('this loss needs at least 100 classes')\n\n\n"
                         "def build_strict(class_counts, gamma=1.0):\n    check_number('losses.strict.gamma', gamma, min=0)\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for mod in ("brokenpkg", "brokenpkg.loss", "oddmod"):
        sys.modules.pop(mod, None)


def _cli(monkeypatch, capsys, *command) -> tuple[int, str, str]:
    """Run `longtail COMMAND` in this process: (exit code, stdout, stderr)."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["longtail", *command])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_plugins_list_marks_broken_plugins_without_running_their_packages(faulty_plugins, monkeypatch, capsys):
    """A package whose __init__ raises crashed `plugins list` (find_spec of brokenpkg.loss imported
    brokenpkg): listing now finds submodules without running any package's code, so it can tell a missing
    module or function but not an __init__ that raises (`plugins check` and selecting it tell that)."""
    code, out, _ = _cli(monkeypatch, capsys, "plugins", "list", "losses")
    problems = {line.split()[0]: line.partition("  BROKEN: ")[2] for line in out.splitlines()[1:]}
    assert code == 1 and "brokenpkg" not in sys.modules
    assert problems["brokenloss"] == "" and problems["valerr"] == "" and problems["notcall"] == ""
    assert problems["notthere"] == "module 'brokenpkg.loss' defines no 'nothere'"
    assert problems["nomod"] == "module 'brokenpkg.nomod' is not installed"


def test_plugins_check_marks_an_import_failure_and_a_non_callable_build(faulty_plugins, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "plugins", "check")
    problems = {line.split()[0]: line.partition("  BROKEN: ")[2] for line in out.splitlines() if line.startswith("  ")}
    assert code == 1
    assert problems["brokenloss"] == ("losses plugin 'brokenloss' (faultplug, brokenpkg.loss:build) failed to import: "
                                      "RuntimeError: brokenpkg needs CUDA 13")
    assert problems["notcall"] == ("losses plugin 'notcall' (faultplug, oddmod:build) is not callable: "
                                   "oddmod:build is of type int, not a build function")
    assert problems["valerr"] == ""  # its build needs class counts: only a run (or `longtail check`) tells


@pytest.mark.parametrize("overrides, message", [
    ({}, None),  # the broken plugins are not selected: ignored
    ({"loss": "brokenloss"}, "losses plugin 'brokenloss' (faultplug, brokenpkg.loss:build) failed to import: "
                             "RuntimeError: brokenpkg needs CUDA 13"),
    ({"loss": "valerr"}, "losses plugin 'valerr' (faultplug, oddmod:build_valerr) failed to build: "
                         "ValueError: this loss needs at least 100 classes"),
    ({"loss": "notcall"}, "losses plugin 'notcall' (faultplug, oddmod:build) is not callable: "
                          "oddmod:build is of type int, not a build function"),
    # a plugin's own LongtailError, and a key its build does not take, keep their messages
    ({"loss": "strict", "losses.strict.gamma": -1}, "losses.strict.gamma must be >= 0, got -1"),
    ({"loss": "strict", "losses.strict.gama": 1},
     "unknown key losses.strict.gama in params.yaml (did you mean losses.strict.gamma?)"),
])
def test_check_reports_a_selected_plugins_failure_in_one_line(faulty_plugins, default_params, monkeypatch, capsys,
                                                              overrides, message):
    from pipeline.params import override

    (faulty_plugins / "params.yaml").write_text(yaml.safe_dump(override(default_params, overrides)))
    code, out, err = _cli(monkeypatch, capsys, "check")
    if message is None:
        assert code == 0 and out.startswith("params.yaml: ok"), err
    else:
        assert (code, err) == (2, f"error: {message}\n")


# -- a plugin that exits, interrupts or breaks the contract at import or build (rows 73-74) -----------------------

EXIT_LINE = "fakeplug needs libfoo; please install it"


@contextmanager
def _sigint(handler):
    """Start the command with this SIGINT disposition: Python's own handler (a shell's foreground job) or
    SIG_IGN (a background job of a non-interactive shell, e.g. `nohup ... &`: CI may start the suite so,
    and install() leaves an ignored SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def rogue_plugins(tmp_path, monkeypatch, default_params):
    """Losses whose import calls sys.exit(...), raises KeyboardInterrupt itself, or sends this process a real
    SIGINT (a Ctrl-C while it imports); losses whose build returns a head the models lack, or None.
    params.yaml here selects ce."""
    fake_dist(tmp_path, "rogueplug",
              "[longtail.losses]\nexitloss = exitmod:build\nkiloss = kimod:build\nctrlc = ctrlcmod:build\n"
              "badhead = headmod:build_mlp\nnoneloss = headmod:build_none\n",
              {"exitmod": f"import sys\nsys.exit({EXIT_LINE!r})\n\n\ndef build(class_counts):\n    pass\n",
               "kimod": "raise KeyboardInterrupt('from the plugin')\n\n\ndef build(class_counts):\n    pass\n",
               "ctrlcmod": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n\n\n"
                           "def build(class_counts):\n    pass\n",
               "headmod": "from types import SimpleNamespace\n\n\ndef build_mlp(class_counts):\n"
                          "    return SimpleNamespace(head='mlp')\n\n\ndef build_none(class_counts):\n    return None\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for mod in ("exitmod", "kimod", "ctrlcmod", "headmod"):
        sys.modules.pop(mod, None)


def test_plugins_check_reports_a_plugin_that_exits_or_interrupts_at_import(rogue_plugins, monkeypatch, capsys):
    """`sys.exit("... needs libfoo")` in a plugin's import made `longtail plugins check` print only that text and
    exit 1, with no report on the other plugins; `raise KeyboardInterrupt` there said `interrupted (Ctrl-C)`,
    exit 130. Both are now that plugin's failure to import, marked BROKEN among all the others."""
    monkeypatch.setattr(registry, "discover", lambda group=None, _d=registry.discover: [
        p for p in _d(group) if p.name != "ctrlc"])  # the real Ctrl-C has its own test below
    with _sigint(signal.default_int_handler):
        code, out, err = _cli(monkeypatch, capsys, "plugins", "check")
    problems = {line.split()[0]: line.partition("  BROKEN: ")[2] for line in out.splitlines() if line.startswith("  ")}
    assert code == 1 and err == "", err
    assert problems["exitloss"] == f"losses plugin 'exitloss' (rogueplug, exitmod:build) failed to import: SystemExit: {EXIT_LINE}"
    assert problems["kiloss"] == ("losses plugin 'kiloss' (rogueplug, kimod:build) failed to import: "
                                  "KeyboardInterrupt: from the plugin")
    assert problems["ce"] == problems["resnet32"] == problems["badhead"] == ""  # the others are all reported


@pytest.mark.parametrize("loss, message", [
    ("exitloss", f"losses plugin 'exitloss' (rogueplug, exitmod:build) failed to import: SystemExit: {EXIT_LINE}"),
    ("kiloss", "losses plugin 'kiloss' (rogueplug, kimod:build) failed to import: KeyboardInterrupt: from the plugin"),
    ("badhead", "losses plugin 'badhead' (rogueplug, headmod:build_mlp) declares head 'mlp' "
                "(valid: linear, linear_nobias, cosine)"),
    ("noneloss", "losses plugin 'noneloss' (rogueplug, headmod:build_none) returned None from build; it must return "
                 "nn.Module with forward(logits, target, class_weight=None) and .head"),
])
def test_check_names_a_selected_plugin_that_exits_or_breaks_the_contract(rogue_plugins, default_params, monkeypatch,
                                                                         capsys, loss, message):
    """`longtail check` printed a selected plugin's sys.exit text bare (exit 1, the plugin unnamed), and said ok
    for a loss with head 'mlp' or a build returning None, which pretrain then refused: the check builds through
    the same registry.build, which checks what the stage needs (registry.check_built)."""
    from pipeline.params import override

    (rogue_plugins / "params.yaml").write_text(yaml.safe_dump(override(default_params, {"loss": loss})))
    with _sigint(signal.default_int_handler):
        assert _cli(monkeypatch, capsys, "check")[::2] == (2, f"error: {message}\n")


def test_a_plugins_own_keyboard_interrupt_is_its_failure_also_where_sigint_is_ignored(rogue_plugins, default_params,
                                                                                      monkeypatch, capsys):
    """CI ran the suite as a background job, SIGINT ignored: install() left it so, and the plugin's own
    KeyboardInterrupt was taken for a Ctrl-C (exit 130). No Ctrl-C can arrive there, so it is the plugin's."""
    from pipeline.params import override

    (rogue_plugins / "params.yaml").write_text(yaml.safe_dump(override(default_params, {"loss": "kiloss"})))
    with _sigint(signal.SIG_IGN):
        assert _cli(monkeypatch, capsys, "check")[::2] == (
            2, "error: losses plugin 'kiloss' (rogueplug, kimod:build) failed to import: KeyboardInterrupt: from the plugin\n")


def test_a_real_ctrl_c_while_a_plugin_imports_still_interrupts(rogue_plugins, default_params, monkeypatch, capsys):
    from pipeline.params import override

    (rogue_plugins / "params.yaml").write_text(yaml.safe_dump(override(default_params, {"loss": "ctrlc"})))
    with _sigint(signal.default_int_handler):
        assert _cli(monkeypatch, capsys, "check")[::2] == (130, "interrupted (Ctrl-C)\n")
