"""The one place that talks to MLflow.

Store: $MLFLOW_TRACKING_URI, else sqlite at the project root (mlflow.db; artifacts in mlartifacts/).
The root is $DVC_ROOT when DVC runs the stage, so `dvc exp run --temp/--queue` (which run in a
temporary copy) still log into the project's store. Each stage is an MLflow run, nested under one
parent run per pipeline execution: the DVC experiment name when there is one, else a hash of the
params and the git commit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # longtail report downloads

GROUP_TAG = "longtail.group"
DEFAULT_EXPERIMENT = "longtail"  # the MLflow experiment when params.yaml has no tracking.experiment


def project_root() -> Path:
    env = os.environ.get("LONGTAIL_ROOT") or os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").exists() or (p / ".dvc").is_dir():
            return p
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time: parallel queued experiments retry on a locked store."""
    for attempt in range(30):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps the sqlite error in its own exception types
            if "locked" not in str(exc).lower() or attempt == 29:
                raise
            time.sleep(0.2 + 0.1 * attempt)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class StageRun:
    """A thin handle that stages use to log; all MLflow calls go through here."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            _retry(self.client.log_batch, self.run_id, metrics=items[i:i + 500])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)


@contextmanager
def _init_lock():
    """An inter-process lock around store and experiment creation: MLflow creates and migrates an
    sqlite schema without one, so parallel queue workers on a fresh store crashed ("duplicate column
    name", "table ... already exists"). The lock file sits next to the sqlite file (or in .longtail/
    for other stores), so every process of one store takes the same lock."""
    import fcntl

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        lock = Path(uri[len("sqlite:///"):] + ".init.lock")
    else:
        lock = project_root() / ".longtail" / "mlflow-init.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def client_and_experiment(name: str):
    """(MlflowClient, experiment id), creating the store and the experiment under the init lock."""
    from mlflow.tracking import MlflowClient

    with _init_lock():
        client = MlflowClient(tracking_uri=tracking_uri())
        return client, _retry(_experiment_id, client, name)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())
    except Exception:  # created meanwhile by a parallel run
        return client.get_experiment_by_name(name).experiment_id


def _group(raw_params: dict) -> tuple[str, str]:
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    commit = _git_commit()
    if exp_name:
        return exp_name, commit
    digest = hashlib.sha256((json.dumps(raw_params, sort_keys=True) + commit).encode()).hexdigest()[:12]
    return f"repro-{digest}", commit


@contextmanager
def stage_run(stage: str, raw_params: dict, experiment: str = DEFAULT_EXPERIMENT):
    """Open an MLflow run for one stage, nested under its pipeline-execution parent run."""
    client, exp_id = client_and_experiment(experiment)
    group, commit = _group(raw_params)
    tags = {GROUP_TAG: group, "longtail.commit": commit, "mlflow.source.git.commit": commit,
            "longtail.dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
            "longtail.dataset": raw_params.get("dataset"), "longtail.loss": raw_params.get("loss")}
    parents = _retry(client.search_runs, [exp_id],
                     filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`longtail.parent` = 'true'",
                     max_results=1)
    if parents:
        parent_id = parents[0].info.run_id
    else:
        parent = _retry(client.create_run, exp_id, run_name=group, tags={**tags, "longtail.parent": "true"})
        parent_id = parent.info.run_id
        StageRun(client, parent_id).log_params(raw_params)
    # a run of this stage left RUNNING by a killed process: mark it KILLED (the workspace lock rules out
    # a live one); the new run re-logs the resumed epochs, so it alone shows the whole curve
    stale = _retry(client.search_runs, [exp_id],
                   filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`longtail.stage` = '{stage}' "
                                 "and attributes.status = 'RUNNING'")
    for r in stale:
        _retry(client.set_terminated, r.info.run_id, "KILLED")
    run = _retry(client.create_run, exp_id, run_name=f"{group}/{stage}",
                 tags={**tags, "longtail.stage": stage, "mlflow.parentRunId": parent_id})
    handle = StageRun(client, run.info.run_id)
    handle.log_params(raw_params)
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    finally:
        _retry(client.set_terminated, run.info.run_id, status)


def ensure_experiment(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the store and the experiment now: parallel queue workers starting on a fresh sqlite store
    would otherwise race to create its tables (one of them fails). Returns the experiment id."""
    return client_and_experiment(experiment)[1]


# -- reading (longtail report) -------------------------------------------------------------------

def finished_runs(stage: str = "evaluate", experiment: str = DEFAULT_EXPERIMENT) -> list[dict]:
    """Every FINISHED run of one stage, as plain dicts: run_id, group, start_time, params, metrics,
    tags. An sqlite store that does not exist yet reads as empty (and is not created)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.`longtail.stage` = '{stage}' and attributes.status = 'FINISHED'")
        out.extend({"run_id": r.info.run_id, "group": r.data.tags.get(GROUP_TAG, ""), "start_time": r.info.start_time,
                    "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
                   for r in page)
        token = page.token
        if not token:
            return out


def fetch_artifact(run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download one artifact of a run into dst (a folder); None when the run has no such artifact."""
    from mlflow.tracking import MlflowClient

    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient(tracking_uri=tracking_uri()).download_artifacts(run_id, path, str(dst)))
    except Exception:  # missing artifact: mlflow raises its own (store-dependent) exception types
        return None
