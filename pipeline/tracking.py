"""The one place that talks to MLflow.

Store: $MLFLOW_TRACKING_URI, else sqlite at the project root (mlflow.db; artifacts in mlartifacts/).
In that sqlite store, artifact locations are relative to the project root ("mlartifacts/<id>"), so a
copied or moved project (or a container with the workspace mounted elsewhere) stays self-contained;
`mlflow ui` run at the project root serves them.
The root is $DVC_ROOT when DVC runs the stage, so `dvc exp run --temp/--queue` (which run in a
temporary copy) still log into the project's store. Each stage is an MLflow run, nested under one
parent run per pipeline execution: the DVC experiment name when there is one, else a hash of the
params and the git commit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from . import interrupts
from .data import SOURCE_PROFILE
from .errors import LongtailError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # longtail report downloads

GROUP_TAG = "longtail.group"
PROCESS_TAG = "longtail.process"  # on a stage run: "host pid-namespace pid start" of its process (_process)
DEFAULT_EXPERIMENT = "longtail"  # the MLflow experiment when params.yaml has no tracking.experiment

# MLflow announces creating a store ("Creating initial MLflow database tables...", alembic's migration
# lines) at INFO on every fresh store; keep warnings and errors only.
for _name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)


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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of an sqlite store URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


# the store URIs MLflow opens (tracking and model registry alike), as a message lists them
STORE_SCHEMES = {"": "a file path", "file": "file:///path", "sqlite": "sqlite:///path.db",
                 "postgresql": "postgresql://", "mysql": "mysql://", "mssql": "mssql://",
                 "http": "http(s)://host:port", "https": "", "databricks": "databricks"}
SERVER_TIMEOUT = 5.0  # seconds a tracking server gets to accept a connection


def _check_store(uri: str, write: bool = True, stage: bool = False) -> None:
    """A store that MLflow cannot open fails here at once, in one line: MLflow retries opening a store
    path for about two minutes (a tracking server that is down: over four, with SIGTERM held back,
    as store calls run shielded), with a warning at each try, before it gives up with a traceback;
    a URI of no store type gave MLflow's traceback. `stage`: the message offers --no-track."""
    from urllib.parse import urlsplit

    scheme = urlsplit(uri).scheme.split("+")[0].lower()  # postgresql+psycopg2:// is postgresql's
    if len(scheme) == 1:  # a Windows drive (C:...): a file path
        scheme = ""
    if scheme not in STORE_SCHEMES and scheme not in _plugin_schemes():
        valid = ", ".join(v for v in STORE_SCHEMES.values() if v)
        raise LongtailError(f"the MLflow store {_shown(uri)} (MLFLOW_TRACKING_URI) is of no store type MLflow "
                            f"opens (valid: {valid})")
    if scheme in ("http", "https"):
        _check_server(uri, stage)
        return
    db = _sqlite_file(uri)
    if db is None:
        return
    if db.is_dir():
        raise LongtailError(f"the MLflow store {uri} is a directory, not a database file")
    if not write:
        return
    folder = next(f for f in db.parents if f.exists())  # its folder, or the nearest one above that exists
    if not folder.is_dir():
        raise LongtailError(f"the MLflow store {uri} cannot be made: {folder} is a file, not a folder")
    if folder != db.parent:  # MLflow would make the missing folders: a mistyped path became a new, empty store
        raise LongtailError(f"the MLflow store {uri} cannot be made: its folder {db.parent} does not exist "
                            "(create it, or fix MLFLOW_TRACKING_URI)")
    if not os.access(folder, os.W_OK | os.X_OK):  # sqlite writes a journal beside it
        raise LongtailError(f"the MLflow store {uri} cannot be written: its folder {folder} is not writable")


def _plugin_schemes() -> set[str]:
    """Store types that installed MLflow plugins add (entry points of group mlflow.tracking_store)."""
    from importlib.metadata import entry_points

    return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}


def _shown(uri: str) -> str:
    """A store URI without the password it may hold (https://user:secret@host)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _check_server(uri: str, stage: bool) -> None:
    """A plain TCP connect to the tracking server (or the proxy that requests would use for it), with
    SERVER_TIMEOUT: MLflow's own client retries a server that is down for minutes before it fails."""
    import socket
    from urllib.parse import urlsplit

    import requests.utils  # MLflow's client: the check takes the proxy it would (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY)

    how = "start it, fix MLFLOW_TRACKING_URI" + (", or use --no-track" if stage else "")
    parts = urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:  # a port that is no number or out of range
        host = port = None
    if not host or not port:
        raise LongtailError(f"the MLflow server {_shown(uri)} (MLFLOW_TRACKING_URI) names no valid host and port "
                            f"(valid: http(s)://HOST[:PORT])")
    where = ""
    proxy = requests.utils.select_proxy(uri, requests.utils.get_environ_proxies(uri))
    if proxy:
        try:
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host, port, where = p.hostname, p.port or 80, f" through the proxy {p.hostname}:{p.port or 80}"
        except ValueError:
            return  # a proxy setting requests itself will complain about
    try:
        socket.create_connection((host, port), timeout=SERVER_TIMEOUT).close()
        return
    except socket.gaierror:
        why = f"unknown host {host}"
    except TimeoutError:
        why = f"no answer in {SERVER_TIMEOUT:g} s"
    except ConnectionRefusedError:
        why = "connection refused"
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    raise LongtailError(f"the MLflow server {_shown(uri)} (MLFLOW_TRACKING_URI) cannot be reached{where} ({why}): {how}")


def _active(exp, name: str):
    """An experiment deleted in the MLflow UI still answers get_experiment_by_name, and nothing can be
    logged to it (or read from it): say so and how to go on."""
    if exp is not None and exp.lifecycle_stage != "active":
        import shlex

        uri = tracking_uri()
        restore = f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow experiments restore --experiment-id "
        restore += str(exp.experiment_id)
        raise LongtailError(f"the MLflow experiment {name!r} is deleted in the store {uri}: restore it (`{restore}`) "
                            "or set another tracking.experiment in params.yaml (`longtail report`: --experiment NAME)")
    return exp


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _process(pid: int | None = None) -> str:
    """"host pid-namespace pid start" of a process. The start time (clock ticks since boot, /proc)
    tells a reused pid from the process that had it; the namespace, a container's process from the
    host's of the same name (a --network=host container has the host's name). "-" where /proc is
    absent (macOS): then the host and the pid alone decide."""
    import socket

    pid = os.getpid() if pid is None else pid
    try:  # the fields after the last ")" (the name may hold any character); starttime is field 22
        start = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        start = "-"
    try:
        ns = os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "-"
    except OSError:
        ns = "-"
    return f"{socket.gethostname()} {ns} {pid} {start}"


def _process_gone(tag: str) -> bool:
    """Whether the process a PROCESS_TAG names has ended. Only a process of this machine and pid
    namespace can be checked: any other (a SLURM node's, a container's) counts as alive."""
    host, ns, pid, start = (tag.split(" ") + ["", "", "", ""])[:4]
    here_host, here_ns, _, _ = _process().split(" ")
    if (host, ns) != (here_host, here_ns) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    now = _process(int(pid)).split(" ")[3]
    return start != "-" and now not in (start, "-")


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time: parallel queued experiments retry on a locked store. Each
    call runs whole: a SIGTERM or Ctrl-C that arrives during it is raised when it returns (a write cut
    in half keeps the store locked against the clean-up that ends the runs KILLED)."""
    for attempt in range(30):
        try:
            with interrupts.shielded():
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
        self.parent: StageRun | None = None  # the pipeline-execution run this stage is nested under

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

    def log_epoch(self, row: dict, **extra) -> None:
        """One epoch's row (the trainer's 0-based `epoch` index) at step = the epoch number counted from 1,
        the convention of the console, eval.json, history.csv and the figures."""
        self.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, **extra}, step=int(row["epoch"]) + 1)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        with _at_root(), self._writing_artifact("/".join(filter(None, (artifact_path, path.name)))):
            _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_table(self, columns: dict, artifact_file: str) -> None:
        """One table (columns of equal length) as an MLflow table artifact (the UI's table view)."""
        with _at_root(), self._writing_artifact(artifact_file):
            _retry(self.client.log_table, self.run_id, columns, artifact_file)

    @contextmanager
    def _writing_artifact(self, name: str):
        """An artifact store that cannot be written (a full disk, a denied folder, a file where a folder
        should be) fails the stage with one line naming the run's artifact location and the OS error."""
        try:
            yield
        except OSError as exc:
            try:
                where = self.client.get_run(self.run_id).info.artifact_uri
            except Exception:  # a tracking server that is down: name the run instead
                where = f"of run {self.run_id}"
            if ":" not in where and not where.startswith("of run"):  # a local store's, relative to the root
                where = str(project_root() / where)
            why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc) or type(exc).__name__
            raise LongtailError(f"cannot write the artifact {name} to the MLflow artifact store {where} ({why}): "
                                "free or fix that location, or run the stage with --no-track") from None

    def end_killed(self, run_id: str | None) -> None:
        """The run that wrote the resume checkpoint this run continues was killed (a kill -9 never ends
        it): mark it KILLED, and its parent too unless it is this run's own. `dvc exp run` names every
        run anew, so the killed run is often in another group, where `stage_run` does not look."""
        from mlflow.exceptions import MlflowException

        if not run_id or run_id == self.run_id:
            return
        try:
            killed = _retry(self.client.get_run, run_id)
        except MlflowException:  # written to another store, or deleted since: nothing to end here
            return
        parent = killed.data.tags.get("mlflow.parentRunId")
        for rid in (run_id, parent if parent and parent != getattr(self.parent, "run_id", None) else None):
            if rid and _retry(self.client.get_run, rid).info.status == "RUNNING":
                _retry(self.client.set_terminated, rid, "KILLED")

    def log_history(self, history: list[dict]) -> None:
        """Many epochs' rows at once (as `log_epoch`: step = epoch number from 1)."""
        ts = int(time.time() * 1000)
        from mlflow.entities import Metric

        items = [Metric(k, float(v), ts, int(row["epoch"]) + 1) for row in history for k, v in row.items()
                 if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            _retry(self.client.log_batch, self.run_id, metrics=items[i:i + 500])


@contextmanager
def _at_root():
    """Artifact locations are relative to the project root: resolve them there, not in a DVC temp copy."""
    old = os.getcwd()
    os.chdir(project_root())
    try:
        yield
    finally:
        os.chdir(old)


def _portable(uri: str, exp_id: str) -> None:
    """Store the experiment's artifact location relative to the project root ("mlartifacts/<id>"; MLflow
    itself only stores absolute ones), and hide the `Default` experiment MLflow creates with the
    store (its location is wherever the first process happened to run, e.g. a deleted DVC temp copy)."""
    db = _sqlite_file(uri)
    if db is None:
        return
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            for eid in {"0", str(exp_id)}:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ? "
                            "AND artifact_location NOT LIKE 'mlartifacts/%' "
                            "AND (artifact_location LIKE 'file:%' OR artifact_location LIKE '/%')",
                            (f"mlartifacts/{eid}", int(eid)))
            con.execute("UPDATE experiments SET lifecycle_stage = 'deleted' WHERE experiment_id = 0 "
                        "AND lifecycle_stage = 'active' AND NOT EXISTS (SELECT 1 FROM runs WHERE experiment_id = 0)")
    finally:
        con.close()


@contextmanager
def _init_lock():
    """An inter-process lock around store and experiment creation: MLflow creates and migrates an
    sqlite schema without one, so parallel queue workers on a fresh store crashed ("duplicate column
    name", "table ... already exists"). The lock file sits next to the sqlite file (or in .longtail/
    for other stores), so every process of one store takes the same lock."""
    import fcntl

    db = _sqlite_file(tracking_uri())
    lock = Path(f"{db}.init.lock") if db is not None else project_root() / ".longtail" / "mlflow-init.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def client_and_experiment(name: str, stage: bool = False):
    """(MlflowClient, experiment id), creating the store and the experiment under the init lock."""
    _check_store(tracking_uri(), stage=stage)  # before MLflow is imported (seconds on a busy machine)
    from mlflow.tracking import MlflowClient

    with _init_lock():  # each store call (the first creates / migrates the schema) runs whole, in _retry
        client = MlflowClient(tracking_uri=tracking_uri())
        return client, _experiment_id(client, name)


def _experiment_id(client, name: str) -> str:
    exp = _active(_retry(client.get_experiment_by_name, name), name)
    if exp is None:
        # a local store keeps artifacts in the project (made relative by _portable); a tracking server
        # uses its own (shared) artifact root
        local = tracking_uri().startswith(("sqlite:", "file:", "/"))
        try:
            exp_id = _retry(client.create_experiment, name,
                            artifact_location=(project_root() / "mlartifacts").as_uri() if local else None)
        except Exception:  # created meanwhile by a parallel run
            exp_id = _retry(client.get_experiment_by_name, name).experiment_id
    else:
        exp_id = exp.experiment_id
    _retry(_portable, tracking_uri(), exp_id)
    return exp_id


def _group(raw_params: dict) -> tuple[str, str]:
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    commit = _git_commit()
    if exp_name:
        return exp_name, commit
    return f"repro-{_params_digest(raw_params, commit)[:12]}", commit


def _params_digest(raw_params: dict, salt: str = "") -> str:
    return hashlib.sha256((json.dumps(raw_params, sort_keys=True, default=str) + salt).encode()).hexdigest()


def _logged_with(run, raw_params: dict) -> bool:
    """Whether a parent run was logged with these params (as StageRun.log_params writes them)."""
    logged = run.data.params
    return all(logged.get(k) == str(v)[:6000] for k, v in _flatten(raw_params).items())


def _parent_of(client, exp_id: str, group: str):
    runs = _retry(client.search_runs, [exp_id], max_results=1,
                  filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`longtail.parent` = 'true'")
    return runs[0] if runs else None


def newest_parent(client, exp_id: str, name: str):
    """The parent run of the newest pipeline execution of a DVC experiment name. Its group is the name,
    or `name~<digest>` when the name was used again for other params (stage_run)."""
    runs = _retry(client.search_runs, [exp_id], max_results=1, order_by=["attributes.start_time DESC"],
                  filter_string=f"tags.`longtail.dvc_exp` = '{name}' and tags.`longtail.parent` = 'true'")
    return runs[0] if runs else _parent_of(client, exp_id, name)


# what a user compares in the runs table: copied from the evaluate run onto the parent run
PARENT_METRICS = ("final_top1", "best_top1", "final_many", "final_medium", "final_few", "final_error", "best_error",
                  "final_epoch", "best_epoch")


def _run_tags(raw_params: dict, group: str, commit: str) -> dict:
    from .method_names import MethodNames, flatten
    from .registry import plugin_versions

    flat = flatten(raw_params)
    try:
        method = MethodNames.load().name(flat)
    except Exception:  # an unreadable method_names.yaml must not stop training
        method = str(raw_params.get("loss"))
    plugins = plugin_versions(raw_params)
    tags = {GROUP_TAG: group, "longtail.commit": commit, "mlflow.source.git.commit": commit,
            "longtail.dvc_exp": os.environ.get("DVC_EXP_NAME", ""), "method": method,
            "dataset": raw_params.get("dataset"), "imbalance": raw_params.get("imbalance"),
            "ratio": None if raw_params.get("imbalance") == SOURCE_PROFILE else raw_params.get("ratio"),
            "seed": raw_params.get("seed"),
            "longtail.dataset": raw_params.get("dataset"), "longtail.loss": raw_params.get("loss"),
            "longtail.plugins": ", ".join(f"{d} {v}" for d, v in plugins.items()) or "built-in only",
            **{f"longtail.plugin.{d}": v for d, v in plugins.items()}}
    # tag values are strings: a file or sqlite store converts them, a tracking server (REST) refuses others
    return {k: "" if v is None else str(v) for k, v in tags.items()}


def _wall_seconds(client, exp_id: str, group: str, now_ms: int) -> float:
    """Wall time of the pipeline: the latest run of each stage of this group, end - start, summed."""
    latest: dict = {}
    for r in _retry(client.search_runs, [exp_id], max_results=1000,
                    filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`longtail.stage` != ''"):
        stage = r.data.tags.get("longtail.stage")
        if stage and (stage not in latest or r.info.start_time > latest[stage].info.start_time):
            latest[stage] = r
    return sum(((r.info.end_time or now_ms) - r.info.start_time) / 1000 for r in latest.values())


@contextmanager
def stage_run(stage: str, raw_params: dict, experiment: str = DEFAULT_EXPERIMENT):
    """Open an MLflow run for one stage, nested under its pipeline-execution parent run. The parent
    carries what a user compares (method, dataset, imbalance, ratio, seed as tags; final / best top-1,
    many / medium / few, wall time as metrics); it ends FINISHED after the evaluate stage, FAILED when a
    stage fails, KILLED when one is interrupted (Ctrl-C, SIGTERM), and is RUNNING in between."""
    client, exp_id = client_and_experiment(experiment, stage=True)
    group, commit = _group(raw_params)
    # Everything from here runs inside the try: a stop (Ctrl-C, SIGTERM) that arrives while the runs
    # are being set up still ends them KILLED. A store call runs whole (interrupts.shielded, in
    # _retry); the run creations are shielded with their assignment, so a stop raised as one
    # returns never loses the id of a run it created.
    parent_id = run_id = None
    status = "FAILED"
    try:
        parent = _parent_of(client, exp_id, group)
        if parent is not None and not _logged_with(parent, raw_params):
            # the name is an earlier, different experiment's (DVC lets a removed experiment's name be
            # used again): this one gets a group of its own instead of joining that one's runs
            group = f"{group}~{_params_digest(raw_params)[:8]}"
            parent = _parent_of(client, exp_id, group)
        tags = _run_tags(raw_params, group, commit)
        if parent is not None:
            parent_id = parent.info.run_id
            if parent.info.status != "RUNNING":
                _retry(client.update_run, parent_id, status="RUNNING")
        else:
            setting = " ".join(t for t in (tags["dataset"], tags["imbalance"], tags["ratio"]) if t)
            name = f"{tags['method']} · {setting} · seed {tags['seed']} · {group}"
            with interrupts.shielded():
                parent_id = _retry(client.create_run, exp_id, run_name=name,
                                   tags={**tags, "longtail.parent": "true"}).info.run_id
            StageRun(client, parent_id).log_params(raw_params)
        # a run of this stage left RUNNING by a killed process: mark it KILLED (the workspace lock rules
        # out a live one); the new run re-logs the resumed epochs, so it alone shows the whole curve
        stale = _retry(client.search_runs, [exp_id],
                       filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`longtail.stage` = '{stage}' "
                                     "and attributes.status = 'RUNNING'")
        for r in stale:
            _retry(client.set_terminated, r.info.run_id, "KILLED")
        _end_dead(client, exp_id, group)
        with interrupts.shielded():
            run_id = _retry(client.create_run, exp_id, run_name=f"{group}/{stage}",
                            tags={**tags, "longtail.stage": stage, "mlflow.parentRunId": parent_id,
                                  PROCESS_TAG: _process()}).info.run_id
        handle = StageRun(client, run_id)
        handle.parent = StageRun(client, parent_id)
        handle.log_params(raw_params)
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (interrupts.Terminated): stopped, not failed
        status = "KILLED"
        raise
    finally:
        with interrupts.shielded():  # the whole clean-up: a stop arriving now is raised after it
            if run_id is not None:
                _retry(client.set_terminated, run_id, status)
            if parent_id is not None and status != "FINISHED":
                _retry(client.set_terminated, parent_id, status)
            elif parent_id is not None and stage == "evaluate":
                metrics = _retry(client.get_run, run_id).data.metrics
                now = int(time.time() * 1000)
                StageRun(client, parent_id).log_metrics({**{k: metrics[k] for k in PARENT_METRICS if k in metrics},
                                                        "wall_seconds": _wall_seconds(client, exp_id, group, now)})
                _retry(client.set_terminated, parent_id, "FINISHED")


def _end_dead(client, exp_id: str, group: str) -> None:
    """Stage runs of other pipeline executions that a dead process of this machine left RUNNING: a
    kill -9, the OOM killer or a closed session before the first resume checkpoint, so no resumed run
    names them (StageRun.end_killed) and a re-run under a new DVC experiment name never looks at their
    group. Each is marked KILLED, with its parent run, unless a live stage of that group still runs."""
    import socket

    host = socket.gethostname().replace("'", "''")
    running = _retry(client.search_runs, [exp_id], max_results=1000,
                     filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host} %'")
    dead = [r for r in running if r.data.tags.get(GROUP_TAG) != group and _process_gone(r.data.tags[PROCESS_TAG])]
    dead_ids = {r.info.run_id for r in dead}
    live_groups = {r.data.tags.get(GROUP_TAG) for r in running if r.info.run_id not in dead_ids}
    for r in dead:
        _retry(client.set_terminated, r.info.run_id, "KILLED")
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent and r.data.tags.get(GROUP_TAG) not in live_groups \
                and _retry(client.get_run, parent).info.status == "RUNNING":
            _retry(client.set_terminated, parent, "KILLED")


def ensure_experiment(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the store and the experiment now: parallel queue workers starting on a fresh sqlite store
    would otherwise race to create its tables (one of them fails). Returns the experiment id."""
    return client_and_experiment(experiment)[1]


# -- reading (longtail report) -------------------------------------------------------------------

def existing_experiment(experiment: str = DEFAULT_EXPERIMENT):
    """(client, experiment) of a store and experiment that already exist, else None; an sqlite store
    that does not exist yet is not created."""
    uri = tracking_uri()
    _check_store(uri, write=False)
    from mlflow.tracking import MlflowClient

    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        return None
    client = MlflowClient(tracking_uri=uri)
    exp = _active(client.get_experiment_by_name(experiment), experiment)
    return None if exp is None else (client, exp)


def finished_runs(stage: str = "evaluate", experiment: str = DEFAULT_EXPERIMENT) -> list[dict]:
    """Every FINISHED run of one stage, as plain dicts: run_id, group, start_time, params, metrics,
    tags. An sqlite store that does not exist yet reads as empty (and is not created)."""
    found = existing_experiment(experiment)
    if found is None:
        return []
    client, exp = found
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


def parent_summary(group: str, experiment: str = DEFAULT_EXPERIMENT) -> dict | None:
    """The parent run of one pipeline execution (a DVC experiment name: the newest of that name) as a flat dict: its tags
    (method, dataset, imbalance, ratio, seed) and its metrics; None when it is not in the store."""
    found = existing_experiment(experiment)
    if found is None:
        return None
    client, exp = found
    r = newest_parent(client, exp.experiment_id, group)
    if r is None:
        return None
    return {**{k: r.data.tags.get(k) for k in ("method", "dataset", "imbalance", "ratio", "seed")},
            **r.data.metrics, "status": r.info.status, "experiment_id": exp.experiment_id}


def fetch_artifact(run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download one artifact of a run into dst (a folder); None when the run has no such artifact."""
    from mlflow.tracking import MlflowClient

    dst = Path(dst).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with _at_root():
            return Path(MlflowClient(tracking_uri=tracking_uri()).download_artifacts(run_id, path, str(dst)))
    except Exception:  # missing artifact: mlflow raises its own (store-dependent) exception types
        return None
