"""The environment a test's subprocess (the longtail CLI, dvc, git) runs in."""

from __future__ import annotations

import os


def clean_env(**extra: str) -> dict:
    """The caller's environment without its MLflow tracking and DVC settings (a subprocess must not log
    into the caller's store or act on the caller's DVC repo), with MLflow telemetry and DVC analytics
    off and a git identity for commits in temporary repos; `extra` adds or replaces variables."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    e.update(MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
             GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    e.update(extra)
    return e
