"""Test support shared by tests/unit, tests/e2e and plugins/*/tests, importable as `testkit` (pyproject.toml
puts tests/ on pytest's pythonpath): one home for each fact the tests rely on.

- paths: ROOT, the repository root
"""

from .paths import ROOT

__all__ = ["ROOT"]
