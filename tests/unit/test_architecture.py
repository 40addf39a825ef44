"""The core never names a method: no plugin name appears in pipeline/engine/ or pipeline/stages/
(methods reach the trainer only as objects, through the registry and build.py)."""

import re

from testkit import ROOT

from pipeline import registry

GROUPS = ("losses", "reweighting", "samplers", "models", "finetune")
# names that are also plain words of the core's vocabulary
GENERIC = {"none", "instance", "continue", "inverse", "reversed", "progressive", "ce", "cb", "am", "hinge", "sqrt"}


def test_no_method_is_named_in_the_engine_or_the_stages():
    names = {n for g in GROUPS for n in registry.names(g)} - GENERIC
    names |= {"ldam", "lsoftmax", "needs_norms", "strong_augment"}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for folder in ("pipeline/engine", "pipeline/stages") for path in sorted((ROOT / folder).glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


# -- issue 11.4: one home per fact. Each fact below is written in exactly one module of pipeline/.

def _code_lines(pattern: str) -> list[str]:
    """'path:line: text' of every line of pipeline/**/*.py matching `pattern` (comments included)."""
    rx = re.compile(pattern)
    return [f"{path.relative_to(ROOT).as_posix()}:{i}: {line.strip()}"
            for path in sorted((ROOT / "pipeline").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if rx.search(line)]


def _only_in(hits: list[str], home: str) -> list[str]:
    return [h for h in hits if not h.startswith(home + ":")]


def test_the_cifar_normalisation_is_written_once():
    hits = _code_lines(r"0\.4914|0\.2023")
    assert hits and not _only_in(hits, "pipeline/data/sources.py"), "\n".join(hits)


def test_the_default_experiment_name_is_written_once():
    hits = _code_lines(r"""(?i)experiment\w*\s*(:\s*\w+\s*)?=\s*["']longtail["']""")
    assert [h.split(":")[0] for h in hits] == ["pipeline/tracking.py"], "\n".join(hits)


def test_one_atomic_writer_and_one_csv_writer():
    for pattern in (r"os\.replace\(|os\.rename\(|mkstemp\(", r"csv\.(writer|DictWriter)\("):
        hits = _code_lines(pattern)
        assert hits and not _only_in(hits, "pipeline/io.py"), "\n".join(hits)


def test_one_yaml_reader():
    """YAML 1.1 (yaml.safe_load) reads 1e-05 as a string, checks.yaml_load as a number: one reader, one rule."""
    hits = _code_lines(r"yaml\.(safe_load|load|full_load|unsafe_load)\(")
    assert hits and not _only_in(hits, "pipeline/checks.py"), "\n".join(hits)
