import os

import pytest
import yaml

from testkit import ROOT

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def default_params() -> dict:
    """The project's params.yaml as a dict (tests change a copy)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())
