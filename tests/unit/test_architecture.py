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
