"""`longtail sweep --executor slurm`: one SLURM job per experiment, submitted through submitit.

Where things live (the project directory must be on a filesystem the compute nodes share, as home and
scratch directories are on a cluster):

    .longtail/slurm/<sweep>/sweep.json     the experiments, their -S values, commit and SLURM job ids
    .longtail/slurm/<sweep>/jobs/<job id>/  submitit's files per job: the sbatch script, the job's log
    .longtail/slurm/<sweep>/ws/<exp>/       the experiment's workspace while it is unfinished

A job runs its experiment in its own workspace: a `git clone --shared` of the project at the
submitted commit, whose DVC cache is the project's cache (`cache.dir` in .dvc/config.local). There it
runs `dvc exp run -n <exp> -S ...` with the same -S values the local queue would get, then
`dvc exp push --no-cache <project> <exp>` puts the experiment's Git ref into the project, so it shows in
the user's `dvc exp show` without a pull. The cache, the run cache included, is shared, so outputs
need no copying and a re-run stage that already ran anywhere is restored instead of trained.

Why a workspace of its own rather than `dvc exp run --temp`: several `--temp` runs in one repository
share one stash and take each other's entries, and a temp copy is deleted with its resume
checkpoint. The workspace survives a killed job, so the re-submitted job resumes from
`.longtail/resume/` in it. It is removed once the experiment is in the project.

MLflow: jobs log where the submitting shell's MLFLOW_TRACKING_URI points (a team's `mlflow
server`), else to the project's sqlite store. A job killed by the scheduler leaves its stage run
RUNNING; the next job of that experiment (and `longtail sweep --status`) marks it KILLED, so no run
stays RUNNING and the re-run stage logs a fresh run under the same parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tools
from .errors import LongtailError

EXECUTORS = ("local", "slurm")
STATE_DIR = Path(".longtail/slurm")
DEFAULTS = {"partition": None, "time": 240, "gpus": 0, "cpus": 2, "mem": None, "parallel": 0, "options": {}}
ACTIVE = {"PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued",
          "REQUEUE_FED": "queued", "RESIZING": "queued", "SUSPENDED": "queued", "RUNNING": "running",
          "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running"}


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise LongtailError(f"unknown executor {name!r} (valid: {', '.join(EXECUTORS)})")
    return name


# -- options -------------------------------------------------------------------------------------

@dataclass
class SlurmOptions:
    partition: str | None = None
    time: int = 240  # minutes
    gpus: int = 0
    cpus: int = 2
    mem: str | None = None
    parallel: int = 0  # 0 = no limit
    options: dict = field(default_factory=dict)  # any other sbatch option, without the dashes

    def submitit(self, name: str, n_jobs: int) -> dict:
        kw = {"job_name": f"lt-{name}", "time": self.time, "cpus_per_task": self.cpus, "nodes": 1,
              "ntasks_per_node": 1, "stderr_to_stdout": True,
              "array_parallelism": self.parallel or max(n_jobs, 1)}
        if self.partition:
            kw["partition"] = self.partition
        if self.gpus:
            kw["gpus_per_node"] = self.gpus
        if self.mem:
            kw["mem"] = self.mem
        if self.options:
            kw["additional_parameters"] = dict(self.options)
        return kw

    def describe(self) -> str:
        parts = [f"partition={self.partition or '(default)'}", f"time={self.time} min", f"cpus={self.cpus}",
                 f"gpus={self.gpus}", f"mem={self.mem or '(default)'}",
                 f"parallel={self.parallel or 'unlimited'}"]
        parts += [f"--{k}={v}" for k, v in self.options.items()]
        return ", ".join(parts)


def parse_time(value, name: str = "slurm.time") -> int:
    """Minutes from 90, "90", "1:30:00" (H:MM:SS) or "2-00:00:00" (D-HH:MM:SS)."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text)
    if m:
        d, h, mi, s = (int(x or 0) for x in m.groups())
        minutes = d * 1440 + h * 60 + mi + (1 if s else 0)
    elif re.fullmatch(r"\d+", text):
        minutes = int(text)
    else:
        raise LongtailError(f"{name} must be minutes (e.g. 240) or [D-]HH:MM:SS, got {value!r}")
    if minutes < 1:
        raise LongtailError(f"{name} must be at least 1 minute, got {value!r}")
    return minutes


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise LongtailError(f"{name} must be a whole number >= {low}, got {value!r}")
    if int(value) < low:
        raise LongtailError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


LOWEST = {"gpus": 0, "cpus": 1, "parallel": 0}
SET_BY_LONGTAIL = ("array", "output", "error", "job_name", "signal", "open_mode")


def _sbatch_option(key, value, name: str) -> None:
    """One extra sbatch option (`name`: how it was given); longtail's own options are refused."""
    if not isinstance(key, str) or not key.strip("- "):
        raise LongtailError(f"{name}: an sbatch option is named by a word without dashes (e.g. account), got {key!r}")
    if key.strip("- ").replace("-", "_") in SET_BY_LONGTAIL:
        raise LongtailError(f"{name}: sbatch option --{key.strip('- ')} is set by longtail itself; leave it out")
    if isinstance(value, (list, dict)) or value is None or value is False \
            or isinstance(value, float) and not math.isfinite(value):
        raise LongtailError(f"{name} must be an sbatch option's value (a string, a number, or true for a flag), "
                            f"got {value!r}")


def _setting(key: str, value, name: str):
    """One job setting, checked and as SlurmOptions holds it; `name` is how it was given (slurm.time, --time)."""
    if key == "time":
        return parse_time(value, name)
    if key in LOWEST:
        return _count(name, value, LOWEST[key])
    if key == "partition":
        if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[\w.,-]+", value)):
            raise LongtailError(f"{name} must be a partition name (or null for the cluster's default), got {value!r}")
        return value
    if key == "mem":
        if value is not None and not re.fullmatch(r"\d+[KMGT]?", str(value)):
            raise LongtailError(f"{name} must be like 16G or 4000M (or null for the partition's default), "
                                f"got {value!r}")
        return None if value is None else str(value)
    if value is None:  # options
        return {}
    if not isinstance(value, dict):
        raise LongtailError(f"{name} must be a mapping of sbatch options (e.g. {{account: mylab, qos: normal}}), "
                            f"got {value!r}")
    for k, v in value.items():
        _sbatch_option(k, v, f"{name}.{k}")
    return dict(value)


def check_section(section) -> dict:
    """params.yaml's `slurm:` section, each value checked (`longtail check` runs this too): the settings it gives."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise LongtailError(f"slurm must be a mapping of SLURM job settings ({', '.join(DEFAULTS)}), got {section!r}")
    unknown = sorted(str(k) for k in set(section) - set(DEFAULTS))
    if unknown:
        raise LongtailError(f"slurm.{unknown[0]}: unknown key (valid: {', '.join(DEFAULTS)})")
    return {k: _setting(k, v, f"slurm.{k}") for k, v in section.items()}


def options(section: dict | None, flags: dict, extra: list[str] = ()) -> SlurmOptions:
    """params.yaml `slurm:` (defaults), overridden by the flags that were given (not None) and by
    --sbatch KEY=VALUE options."""
    given = {**DEFAULTS, **check_section(section),
             **{k: _setting(k, v, f"--{k}") for k, v in flags.items() if v is not None}}
    given["options"] = dict(given["options"])
    for item in extra:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise LongtailError(f"--sbatch takes KEY=VALUE (an sbatch option without dashes), got {item!r}")
        _sbatch_option(key, value, f"--sbatch {key}")
        given["options"][key] = value
    return SlurmOptions(**given)


# -- the project and its sweeps ------------------------------------------------------------------

def _git(args: list[str], cwd: Path | str = ".", check: bool = True) -> str:
    tools.require("git")
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise LongtailError(f"`git {' '.join(args)}` failed: "
                            f"{tools.why_failed(out.returncode, out.stderr, out.stdout)}")
    return out.stdout.strip()


def exp_ref(commit: str, name: str) -> str:
    """The Git ref DVC gives experiment `name` of baseline `commit`."""
    return f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"


def has_ref(repo: Path | str, ref: str) -> bool:
    tools.require("git")
    return subprocess.run(["git", "show-ref", "--verify", "--quiet", ref], cwd=repo).returncode == 0


def _cache_dir(project: Path) -> Path:
    """The project's DVC cache directory (cache.dir, else .dvc/cache)."""
    try:
        from dvc.repo import Repo

        with Repo(str(project)) as repo:
            return Path(repo.cache.local_cache_dir).resolve()
    except Exception:
        return (project / ".dvc" / "cache").resolve()


@dataclass
class Sweep:
    name: str
    project: str
    commit: str
    experiments: list  # [{"name", "label", "args": [-S args], "jobs": [job ids]}]
    created: float = 0.0

    @property
    def dir(self) -> Path:
        return Path(self.project) / STATE_DIR / self.name

    def save(self) -> None:
        from .io import write_json

        write_json(self.dir / "sweep.json", self.__dict__)  # the one atomic writer: fsynced file and folder

    @classmethod
    def load(cls, path: Path) -> "Sweep":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise LongtailError(f"{path}: not a readable sweep record ({exc})") from None


def sweeps(project: Path, name: str | None = None) -> list[Sweep]:
    root = project / STATE_DIR
    if name is not None:
        path = root / name / "sweep.json"
        if not path.exists():
            known = sorted(p.parent.name for p in root.glob("*/sweep.json"))
            raise LongtailError(f"no SLURM sweep named {name!r} (known: {', '.join(known) or 'none'})")
        return [Sweep.load(path)]
    return sorted((Sweep.load(p) for p in root.glob("*/sweep.json")), key=lambda s: s.created)


@contextlib.contextmanager
def _locked(directory: Path):
    """One `longtail sweep` at a time changes a sweep (submission and status both write it)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_name(commit: str, combos) -> str:
    digest = hashlib.sha256(json.dumps([commit, [c.args() for c in combos]]).encode()).hexdigest()
    return f"sweep-{digest[:7]}"


# -- SLURM's view of the jobs --------------------------------------------------------------------

def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LongtailError(f"{tool} not found: --executor slurm needs the SLURM client commands (run on a login "
                            f"node), or use --executor local (valid: {', '.join(EXECUTORS)})")
    return path


def squeue() -> dict[str, str]:
    """Job id (array tasks as 12_3) -> SLURM state, for every job the controller still lists."""
    require("squeue")
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise LongtailError(f"squeue failed, so the jobs' states are unknown: {msg[-1] if msg else out.returncode}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state
    return states


def _job_paths(sweep: Sweep, job_id: str):
    from submitit.core.utils import JobPaths

    return JobPaths(sweep.dir / "jobs" / "%j", job_id=job_id, task_id=0)


NOISE = re.compile(r"submitit WARNING .* Bypassing signal|View (run|experiment) .*at: https?://")


RAISED = "Submitted job triggered an exception"  # what submitit logs before the job's traceback
RETURNED = "Job completed successfully"
NOT_THE_EXCEPTION = re.compile(r"\s|Traceback \(most recent call last\)|During handling of|The above exception|"
                               r"slurmstepd: |srun: |submitit (INFO|WARNING|ERROR) ")


def _rows(path: Path) -> list[str]:
    """The non-blank lines of the last 64 kB of a job's log ([] when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [r.rstrip() for r in text.replace("\r", "\n").splitlines() if r.strip()]


def _tail(path: Path, lines: int) -> list[str]:
    """The end of a job's log, up to where submitit prints the job's exception (the reason line
    already says it), without submitit's signal notes and MLflow's run links."""
    rows = _rows(path)
    cut = [i for i, r in enumerate(rows) if RAISED in r]
    if cut:
        rows = rows[:cut[0]]
    return [r for r in rows if not NOISE.search(r)][-lines:] if lines else []


def _failure(sweep: Sweep, job_id: str) -> str:
    """Why a job that left the queue without its experiment ended, read from its log: the last line of
    the traceback submitit prints, else a kill. (Never from submitit's result pickle: unpickling a file
    runs whatever code it names.)"""
    paths = _job_paths(sweep, job_id)
    rows = _rows(paths.stdout) + _rows(paths.stderr)  # the job's stderr is in stdout (stderr_to_stdout)
    ends = [i for i, r in enumerate(rows) if RAISED in r or RETURNED in r]
    if not ends:
        return "killed before it finished (scancel, time limit, preemption or node failure)"
    if RETURNED in rows[ends[-1]]:
        return "ended without putting the experiment into the project"
    last = [r.strip() for r in rows[ends[-1] + 1:] if not NOT_THE_EXCEPTION.match(r) and not NOISE.search(r)]
    return last[-1] if last else "raised an error (see its log)"


@dataclass
class Row:
    name: str
    label: str
    state: str  # done | queued | running | failed | not submitted
    job: str
    why: str = ""
    log: list = field(default_factory=list)


def experiment_states(sweep: Sweep, queue: dict[str, str] | None = None, log_lines: int = 12) -> list[Row]:
    queue = squeue() if queue is None else queue
    prefix = exp_ref(sweep.commit, "")
    done = set(_git(["for-each-ref", "--format=%(refname)", prefix], cwd=sweep.project).splitlines())
    rows = []
    for e in sweep.experiments:
        job = e["jobs"][-1] if e["jobs"] else ""
        if prefix + e["name"] in done:
            rows.append(Row(e["name"], e["label"], "done", job))
        elif not job:
            rows.append(Row(e["name"], e["label"], "not submitted", job))
        elif job in queue:
            rows.append(Row(e["name"], e["label"], ACTIVE.get(queue[job], "running"), job, queue[job].lower()))
        else:
            rows.append(Row(e["name"], e["label"], "failed", job, _failure(sweep, job),
                            _tail(_job_paths(sweep, job).stdout, log_lines)))
    return rows


# -- MLflow --------------------------------------------------------------------------------------

def close_stale_runs(name: str, experiment: str, finished: bool = False) -> int:
    """End the MLflow runs of one experiment (the group of the newest pipeline execution named `name`:
    `name~<digest>` when the name was used again for other params) that a killed job left RUNNING: a
    stage run still RUNNING was killed (KILLED); the parent run is KILLED too, or FINISHED once the
    experiment finished (also when a killed attempt had ended it). Returns how many were changed."""
    from . import tracking

    found = tracking.existing_experiment(experiment)
    if found is None:
        return 0
    client, exp = found
    parent = tracking.newest_parent(client, exp.experiment_id, name)
    group = parent.data.tags.get(tracking.GROUP_TAG, name) if parent is not None else name
    runs = tracking._retry(client.search_runs, [exp.experiment_id], max_results=1000,
                           filter_string=f"tags.`{tracking.GROUP_TAG}` = '{group}'")
    changed = 0
    for r in runs:
        parent = r.data.tags.get("longtail.parent") == "true"
        if parent and finished and r.info.status != "FINISHED":
            tracking._retry(client.set_terminated, r.info.run_id, "FINISHED")
        elif r.info.status == "RUNNING":
            tracking._retry(client.set_terminated, r.info.run_id, "KILLED")
        else:
            continue
        changed += 1
    return changed


def ensure_server_experiment(experiment: str) -> None:
    """On a tracking server, create the experiment with the server's own artifact root (its
    --default-artifact-root or proxied --artifacts-destination), shared by the whole team, rather
    than one user's project folder."""
    from . import tracking

    uri = tracking.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    tracking._check_store(uri)  # a server that is down: one line now, not MLflow's minutes of retries
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if tracking._active(client.get_experiment_by_name(experiment), experiment) is None:  # deleted: one line
        try:
            client.create_experiment(experiment)
        except Exception:  # created meanwhile by someone else
            if client.get_experiment_by_name(experiment) is None:
                raise


# -- the job -------------------------------------------------------------------------------------

def _ignore_usr2():
    # SLURM sends the time-limit/preemption warning (USR2) to every process of the job; only the job's
    # own Python process handles it (submitit requeues the job). The training processes must not die of it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _run(cmd: list[str], cwd: Path, env: dict) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env, preexec_fn=_ignore_usr2).returncode


class RunExperiment:
    """The callable submitit runs on the node: one experiment, from its own workspace to a Git ref
    in the project. Re-running it (a re-submitted or requeued job) continues where it stopped."""

    def __init__(self, project: str, commit: str, name: str, args: list[str], sweep: str, experiment: str,
                 cache: str, env: dict):
        self.project, self.commit, self.name, self.args = project, commit, name, list(args)
        self.sweep, self.experiment, self.cache, self.env = sweep, experiment, cache, dict(env)

    @property
    def workspace(self) -> Path:
        return Path(self.project) / STATE_DIR / self.sweep / "ws" / self.name

    def _environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        env["LONGTAIL_ROOT"] = self.project  # the project's sqlite store when no server is set
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cpus = env.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in self.env:
            env["OMP_NUM_THREADS"] = cpus  # torch uses the job's CPUs, not the whole node's
        for k in [k for k in env if k.startswith("DVC_") and k not in ("DVC_NO_ANALYTICS",)]:
            env.pop(k)
        return env

    def _prepare(self, env: dict) -> None:
        ws = self.workspace
        if not (ws / ".git").exists():
            shutil.rmtree(ws, ignore_errors=True)
            ws.parent.mkdir(parents=True, exist_ok=True)
            _git(["clone", "-q", "--shared", "--no-checkout", self.project, str(ws)])
        # tracked files back to the submitted commit (a killed run leaves params.yaml / dvc.lock edited);
        # ignored files stay: the outputs and .longtail/resume/, the checkpoint the training resumes from
        _git(["checkout", "-q", "-f", "--detach", self.commit], cwd=ws)
        # DVC's locks and run records in this workspace belong to an earlier job of this experiment (only
        # one runs at a time), maybe on another node where its pids mean nothing
        shutil.rmtree(ws / ".dvc" / "tmp", ignore_errors=True)
        (ws / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {self.cache}\n")
        raw = Path(self.project) / "data" / "raw"
        if raw.is_dir() and not (ws / "data" / "raw").exists():
            (ws / "data").mkdir(exist_ok=True)
            (ws / "data" / "raw").symlink_to(raw)

    def __call__(self) -> dict:
        start = time.time()
        env = self._environment()
        os.environ.update({k: env[k] for k in ("LONGTAIL_ROOT",)})
        for k in ("MLFLOW_TRACKING_URI",):
            if k in self.env:
                os.environ[k] = self.env[k]
        ref = exp_ref(self.commit, self.name)
        if has_ref(self.project, ref):
            print(f"{self.name}: already in the project ({ref}); nothing to do", flush=True)
            return {"name": self.name, "ref": ref, "seconds": 0.0, "ran": False}
        self._prepare(env)
        ws = self.workspace
        dvc = [sys.executable, "-m", "dvc"]
        if not has_ref(ws, ref):
            closed = close_stale_runs(self.name, self.experiment)
            if closed:
                print(f"{self.name}: marked {closed} MLflow run(s) of an earlier, killed attempt KILLED", flush=True)
            rc = _run([*dvc, "exp", "run", "-n", self.name, *self.args], ws, env)
            if rc != 0:
                close_stale_runs(self.name, self.experiment)
                if rc < 0:
                    raise LongtailError(f"{self.name}: `dvc exp run` was killed by {signal.Signals(-rc).name} "
                                        f"(scancel, time limit or preemption); re-submit to resume")
                raise LongtailError(f"{self.name}: `dvc exp run` failed with exit code {rc} (its output is above)")
        else:
            print(f"{self.name}: finished earlier in {ws}; pushing it", flush=True)
        rc = _run([*dvc, "exp", "push", "--no-cache", self.project, self.name], ws, env)
        if rc != 0 or not has_ref(self.project, ref):
            raise LongtailError(f"{self.name}: `dvc exp push` into {self.project} failed (exit code {rc})")
        close_stale_runs(self.name, self.experiment, finished=True)
        shutil.rmtree(ws, ignore_errors=True)
        print(f"{self.name}: done in {time.time() - start:.0f} s -> {ref}", flush=True)
        return {"name": self.name, "ref": ref, "seconds": time.time() - start, "ran": True}

    def checkpoint(self):
        """Time limit or preemption (submitit's USR2 handler): requeue the same job; the training
        resumes from its last checkpoint in the workspace."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# -- submitting, watching ------------------------------------------------------------------------

def _dirty(project: Path) -> list[str]:
    out = _git(["status", "--porcelain", "--untracked-files=no"], cwd=project)
    return [line.split(maxsplit=1)[-1] for line in out.splitlines() if line.strip()]


def submit(combos, name: str | None, opts: SlurmOptions, experiment: str, echo=print, dry_run: bool = False,
           project: Path | None = None) -> Sweep:
    """Submit the experiments of a grid that are neither finished nor queued/running (all of them on
    the first call): one SLURM job each, as one job array."""
    project = (project or Path.cwd()).resolve()
    if not dry_run:
        require("sbatch")
    commit = _git(["rev-parse", "HEAD"], cwd=project)
    dirty = _dirty(project)
    if dirty and not dry_run:
        raise LongtailError(f"uncommitted changes to {', '.join(dirty[:3])}{' ...' if len(dirty) > 3 else ''}: "
                            f"SLURM jobs run a commit, so commit (or stash) them first")
    name = name or default_name(commit, combos)
    wanted = [{"name": f"{name}-{i}", "label": c.label, "args": c.args(), "jobs": []} for i, c in enumerate(combos)]
    sweep_dir = project / STATE_DIR / name
    with _locked(sweep_dir) if not dry_run else contextlib.nullcontext():
        path = sweep_dir / "sweep.json"
        if path.exists():
            sweep = Sweep.load(path)
            if sweep.commit != commit:
                raise LongtailError(f"sweep {name!r} was submitted at commit {sweep.commit[:9]} and HEAD is now "
                                    f"{commit[:9]}: check that commit out to re-submit it, or give a new --name")
            if [(e["name"], e["args"]) for e in sweep.experiments] != [(e["name"], e["args"]) for e in wanted]:
                raise LongtailError(f"sweep {name!r} exists with another grid: give the same options to re-submit "
                                    f"it, or a new --name")
            rows = {r.name: r for r in experiment_states(sweep)}
        else:
            sweep = Sweep(name, str(project), commit, wanted, time.time())
            rows = {e["name"]: Row(e["name"], e["label"], "not submitted", "") for e in wanted}
        todo = [e for e in sweep.experiments if rows[e["name"]].state in ("failed", "not submitted")]
        for state in ("done", "queued", "running"):
            n = sum(r.state == state for r in rows.values())
            if n:
                echo(f"{n} experiment(s) {state}: not submitted again")
        if dry_run:
            if dirty:
                echo(f"note: uncommitted changes to {', '.join(dirty[:3])}: a real submission refuses them")
            echo(f"sweep {name} at commit {commit[:9]}; sbatch ({opts.describe()}), one job per experiment:")
            for e in todo:
                echo(f"  {e['name']}: dvc exp run -n {e['name']} {' '.join(e['args'])}")
            return sweep
        if not todo:
            echo(f"sweep {name}: nothing to submit")
            sweep.save()
            return sweep
        import submitit

        env = {k: v for k, v in os.environ.items() if k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                                            "MLFLOW_TRACKING_PASSWORD", "OMP_NUM_THREADS")}
        cache = str(_cache_dir(project))
        executor = submitit.SlurmExecutor(folder=sweep_dir / "jobs" / "%j", max_num_timeout=10)
        executor.update_parameters(**opts.submitit(name, len(todo)))
        calls = [RunExperiment(str(project), commit, e["name"], e["args"], name, experiment, cache, env) for e in todo]
        try:
            with executor.batch():
                jobs = [executor.submit(c) for c in calls]
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise LongtailError(f"sbatch refused the jobs: {msg[-1] if msg else type(exc).__name__}") from None
        for e, job in zip(todo, jobs):
            e["jobs"].append(str(job.job_id))
            echo(f"submitted {e['name']}: SLURM job {job.job_id} ({e['label']})")
        sweep.save()
    echo(f"sweep {name}: {len(jobs)} job(s) submitted ({opts.describe()})")
    return sweep


def print_status(sweep: Sweep, rows: list[Row], echo=print) -> None:
    counts = {s: sum(r.state == s for r in rows) for s in ("done", "running", "queued", "failed", "not submitted")}
    echo(f"sweep {sweep.name} (commit {sweep.commit[:9]}, {len(rows)} experiments): "
         + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    width = max(len(r.name) for r in rows) if rows else 4
    for r in rows:
        job = f"job {r.job}" if r.job else "-"
        echo(f"  {r.name:<{width}}  {r.state:<8} {job:<14} {r.label}")
        if r.state == "failed":
            echo(f"      {r.why}")
            for line in r.log:
                echo(f"      | {line}")


def status(name: str | None, experiment: str, echo=print, project: Path | None = None) -> list[Row]:
    """Print each sweep's experiments: done / queued / running / failed (SLURM job id; a failed one's
    reason and log tail). The runs a killed job left RUNNING in MLflow are marked KILLED."""
    project = (project or Path.cwd()).resolve()
    found = sweeps(project, name)
    if not found:
        echo(f"no SLURM sweeps under {project / STATE_DIR}")
        return []
    queue = squeue()
    out = []
    for sweep in found:
        rows = experiment_states(sweep, queue)
        for r in rows:
            if r.state == "failed":
                close_stale_runs(r.name, experiment)
        print_status(sweep, rows, echo)
        out.extend(rows)
    return out


def wait(sweep: Sweep, echo=print, poll: float = 10.0) -> list[Row]:
    """Until no experiment of the sweep is queued or running; prints each change of state."""
    last: dict = {}
    while True:
        rows = experiment_states(sweep, log_lines=0)
        for r in rows:
            if (r.state, r.job) != last.get(r.name):
                echo(f"  {r.name}: {r.state}" + (f" (job {r.job})" if r.job else ""))
                last[r.name] = (r.state, r.job)
        if not any(r.state in ("queued", "running") for r in rows):
            return experiment_states(sweep)
        time.sleep(poll)
