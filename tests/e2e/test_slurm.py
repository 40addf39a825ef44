"""`longtail sweep --executor slurm` against real engines: a single-node slurmctld + slurmd + munge on
localhost (tests/e2e/slurm_cluster.py; skipped with the reason when one cannot be started) and a real
`mlflow server` on 127.0.0.1. A 3-experiment digits sweep: one job is cancelled mid-pretrain, shows as
failed with its job id and log tail, and its re-submission resumes from the checkpoint; then every
experiment is in `dvc exp show` once, every run in the server is ended, and `longtail report` reads
the server."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from testkit import clean_env

from . import slurm_cluster
from .conftest import FAST, make_repo

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("LONGTAIL_SLURM_E2E") != "1",
    reason="the SLURM end-to-end test runs when asked (LONGTAIL_SLURM_E2E=1; `LONGTAIL_SLURM_E2E=1 .ci/run` installs "
           "SLURM first): it starts system daemons as root and adds about 5 minutes, which the 30-minute CI "
           "budget does not hold")]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    try:
        extra, started = slurm_cluster.start()
    except slurm_cluster.Unavailable as exc:
        pytest.skip(f"no real SLURM here: {exc}")
    yield extra
    slurm_cluster.stop(started)


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = tmp_path / "mlflow-server"
    srv.mkdir()
    log = open(srv / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{srv / 'mlflow.db'}",
                             "--artifacts-destination", str(srv / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))  # no GenAI job runners
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"mlflow server did not start:\n{(srv / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()


def run(cmd, cwd, extra, check=True, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-3000:]}")
    return out


def test_slurm_sweep_cancel_resume_one_dvc_list_one_mlflow_server(tmp_path, cluster, mlflow_server):
    t0 = time.time()
    repo = make_repo(tmp_path / "repo")
    extra = {**cluster, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    sweep = [str(BIN / "longtail"), "sweep", "--executor", "slurm", "--name", "e2e", "--seeds", "3", "--cpus", "1",
             "--time", "30", *[a for kv in [*FAST, "train.checkpoint_every=1"] for a in ("-S", kv)]]
    out = run(sweep, repo, extra)
    assert re.findall(r"submitted (e2e-\d): SLURM job (\S+)", out.stdout).__len__() == 3, out.stdout
    record = json.loads((repo / ".longtail/slurm/e2e/sweep.json").read_text())
    job0 = record["experiments"][0]["jobs"][-1]

    # cancel e2e-0 once its pretrain wrote a resume checkpoint (epoch >= 1 of 6), before it finishes
    ckpt = repo / ".longtail/slurm/e2e/ws/e2e-0/.longtail/resume/pretrain.pt"
    deadline = time.time() + 600
    while not ckpt.exists():
        assert time.time() < deadline, "e2e-0 never wrote a pretrain checkpoint"
        time.sleep(0.2)
    run(["scancel", job0], repo, extra)
    t_cancel = time.time()
    assert not (repo / ".longtail/slurm/e2e/ws/e2e-0/models/pretrain.pt").exists(), "pretrain finished before scancel"

    # the other two finish; e2e-0 shows as failed with its job id and the end of its log
    deadline = time.time() + 900
    while True:
        status = run([str(BIN / "longtail"), "sweep", "--status", "--name", "e2e"], repo, extra).stdout
        if "queued" not in status and "running" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(10)
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\s+(e2e-\d)\s+(\w+)\s+job (\S+)", status, re.M)}
    assert rows["e2e-0"] == ("failed", job0), status
    assert rows["e2e-1"][0] == rows["e2e-2"][0] == "done", status
    why = status.split("job " + job0, 1)[1].splitlines()[1]
    assert "killed" in why and "CANCELLED" in status, status  # killed by SIGTERM, or SIGKILL before it could say
    t_first = time.time()

    # re-submitting the same sweep submits only e2e-0, which resumes from its checkpoint
    out = run([*sweep, "--run"], repo, extra, timeout=1200)
    assert "2 experiment(s) done: not submitted again" in out.stdout, out.stdout
    assert len(re.findall(r"submitted e2e-\d", out.stdout)) == 1 and "submitted e2e-0" in out.stdout, out.stdout
    assert "3 done" in out.stdout, out.stdout
    record = json.loads((repo / ".longtail/slurm/e2e/sweep.json").read_text())
    jobs0 = record["experiments"][0]["jobs"]
    assert len(jobs0) == 2 and all(len(e["jobs"]) == 1 for e in record["experiments"][1:]), record
    log = next((repo / ".longtail/slurm/e2e/jobs").glob(f"{jobs0[1]}/*_log.out")).read_text()
    resumed = re.search(r"pretrain: resuming from \S+ at epoch (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < 6, log[-3000:]
    assert not list((repo / ".longtail/slurm/e2e/ws").glob("e2e-*")), "finished workspaces are removed"

    # DVC: all three in the user's `dvc exp show`, once each
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, extra).stdout)
    names = [e["name"] for b in shown for e in (b.get("experiments") or [])]
    assert sorted(names) == ["e2e-0", "e2e-1", "e2e-2"], names

    # MLflow server: one parent per experiment, each stage FINISHED, nothing left RUNNING
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("longtail")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    for name in ("e2e-0", "e2e-1", "e2e-2"):
        mine = [r for r in runs if r.data.tags.get("longtail.group") == name]
        parents = [r for r in mine if r.data.tags.get("longtail.parent") == "true"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", (name, [p.info for p in parents])
        finished = [r.data.tags["longtail.stage"] for r in mine
                    if r.info.status == "FINISHED" and "longtail.stage" in r.data.tags]
        assert sorted(set(finished) - {"build-dataset"}) == ["evaluate", "finetune", "pretrain"], (name, finished)
        assert len(finished) == len(set(finished)), (name, finished)
    killed = [r for r in runs if r.data.tags.get("longtail.group") == "e2e-0" and r.info.status == "KILLED"]
    assert [r.data.tags.get("longtail.stage") for r in killed] == ["pretrain"], [r.info for r in killed]

    # longtail report, unchanged, from the server
    out = run([str(BIN / "longtail"), "report", "-o", "reports", "--runs", "none"], repo, extra)
    assert "3 runs" in out.stdout and (repo / "reports/table.md").exists(), out.stdout
    print(f"\nslurm e2e: first pass (3 jobs, one cancelled at {t_cancel - t0:.0f} s) {t_first - t0:.0f} s, "
          f"re-submitted resume {time.time() - t_first:.0f} s, total {time.time() - t0:.0f} s")
