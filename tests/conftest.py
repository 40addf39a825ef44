import os

import pytest

from testkit import project_params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`, the default in pyproject.toml) each worker, and every stage it
    starts, gets its share of the cores: N workers each running torch on all cores would
    oversubscribe them and be slower than one. Set before torch is imported, so torch's pool and
    the subprocesses' (which inherit the environment) both see it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test that runs the CLI in-process installs its SIGTERM / SIGINT handlers (pipeline.interrupts):
    put back the worker's own, and forget the signals it recorded."""
    import signal

    from pipeline import interrupts

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    interrupts._received.clear()
    interrupts._pending.clear()


@pytest.fixture
def default_params() -> dict:
    """The project's params.yaml as a dict (tests change a copy)."""
    return project_params()
