"""The README states what the code does: its method table is the one method_names.yaml defines."""

import re

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
