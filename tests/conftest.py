import os

import pytest

from testkit import project_params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def default_params() -> dict:
    """The project's params.yaml as a dict (tests change a copy)."""
    return project_params()
