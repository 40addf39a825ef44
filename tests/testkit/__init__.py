"""Test support shared by tests/unit, tests/e2e and plugins/*/tests, importable as `testkit` (pyproject.toml
puts tests/ on pytest's pythonpath): one home for each fact the tests rely on.

- paths: ROOT, the repository root
- params: the project's params.yaml, a named method's settings, the tiny digits settings of the training tests
- env: clean_env(), the environment of a test's subprocess (the longtail CLI, dvc, git)
- twostage (import it by name: torch and the training stages): a prepared tiny dataset, a pretrained trainer for
  the two-stage method tests, a recording MLflow stand-in, a bit-exact state dict comparison
- cifar (import it by name): synthetic CIFAR-10 / CIFAR-100 in the official layout, as a folder or a tarball
- golden (import it by name): the golden run of tests/unit/test_golden.py, in a process of its own
- plugins (import it by name): fake plugin packages (a dist-info with entry points, and modules) to put on sys.path
"""

from .env import clean_env
from .params import named_method_params, project_params, tiny_pretrain_finetune, tiny_two_stage
from .paths import ROOT

__all__ = ["ROOT", "clean_env", "named_method_params", "project_params", "tiny_pretrain_finetune", "tiny_two_stage"]
