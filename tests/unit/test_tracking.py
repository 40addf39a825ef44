"""MLflow store: portable artifact locations, parent runs that end and carry the headline numbers."""

import shutil
import subprocess

import pytest
import yaml

from testkit import ROOT

from pipeline import io, tracking
from pipeline.registry import plugin_versions


def _use(monkeypatch, root, cwd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    monkeypatch.chdir(cwd)


def test_store_is_portable_and_parent_runs_end_with_what_users_compare(tmp_path, monkeypatch, default_params):
    from mlflow.tracking import MlflowClient

    a, temp = tmp_path / "a", tmp_path / "dvc-temp-copy"
    a.mkdir(), temp.mkdir()
    _use(monkeypatch, a, temp)  # the stage runs in a DVC temp copy; the store is the project's
    monkeypatch.setenv("DVC_EXP_NAME", "exp1")
    (temp / "x.txt").write_text("x")
    with tracking.stage_run("pretrain", default_params) as log:
        log.log_epoch({"epoch": 0, "train_loss": 2.0})
    with pytest.raises(RuntimeError):
        with tracking.stage_run("finetune", default_params):
            raise RuntimeError("boom")
    client = MlflowClient(tracking.tracking_uri())
    parent = client.search_runs([tracking.ensure_experiment()], "tags.`longtail.parent` = 'true'")[0]
    assert parent.info.status == "FAILED"  # a failed stage fails the pipeline's run
    with tracking.stage_run("evaluate", default_params) as log:
        log.log_metrics({"final_top1": 0.7, "best_top1": 0.75, "final_many": 0.9, "final_few": 0.4})
        log.log_artifact(temp / "x.txt", "evaluation")
        log.log_table({"class": [0, 1], "acc_final": [0.5, 1.0]}, "evaluation/per_class_table.json")
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["method"] == "ERM-DRW" and parent.data.tags["seed"] == "0"
    assert parent.data.metrics["final_top1"] == 0.7 and parent.data.metrics["wall_seconds"] >= 0
    assert parent.data.tags["longtail.plugins"] == "built-in only"
    # artifacts: under the project root, at a location stored relative to it; nothing in the temp copy
    exp = client.get_experiment_by_name("longtail")
    assert exp.artifact_location == f"mlartifacts/{exp.experiment_id}"
    # the README's link to the runs table names this experiment of a fresh store
    from pipeline.demo import ui_link

    assert ui_link(exp.experiment_id) in (ROOT / "README.md").read_text()
    assert tracking.parent_summary("exp1")["method"] == "ERM-DRW"
    assert len(list((a / "mlartifacts").rglob("x.txt"))) == 1 and len(list(a.rglob("per_class_table.json"))) == 1
    assert not (temp / "mlruns").exists() and not (temp / "mlartifacts").exists()
    assert [e.name for e in client.search_experiments()] == ["longtail"]  # no Default pointing at the temp copy

    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(a)  # the original is gone: the copy must stand alone
    _use(monkeypatch, b, b)
    monkeypatch.setenv("DVC_EXP_NAME", "exp2")
    with tracking.stage_run("evaluate", default_params) as log:
        log.log_artifact(temp / "x.txt", "evaluation")
    assert len(list((b / "mlartifacts").rglob("x.txt"))) == 2 and not a.exists()
    old = [r for r in tracking.finished_runs() if r["group"] == "exp1"][0]
    assert tracking.fetch_artifact(old["run_id"], "evaluation/x.txt", tmp_path / "dl").read_text() == "x"


def test_the_store_leaves_nothing_for_git_status_to_show(tmp_path, monkeypatch, default_params):
    """A user's clone after a run: the store's files at the project root (mlflow.db, the init lock next to
    it, mlartifacts/) are git-ignored; the init lock showed up as untracked."""
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _use(monkeypatch, tmp_path, tmp_path)
    (tmp_path / "x.txt").write_text("x")
    with tracking.stage_run("evaluate", default_params) as log:
        log.log_artifact(tmp_path / "x.txt", "evaluation")
    (tmp_path / "x.txt").unlink()
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == ["?? .gitignore"]


def test_outputs_are_written_with_the_umask_mode_not_0600(tmp_path):
    io.write_json(tmp_path / "m.json", {"a": 1})
    io.write_csv(tmp_path / "t.csv", ["a"], [[1]])
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    for f in ("m.json", "t.csv"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask


def test_plugin_versions_name_the_third_party_distributions_a_run_selects(default_params):
    assert plugin_versions(default_params) == {}  # built-ins are pinned by the git commit
    raw = yaml.safe_load(yaml.safe_dump(default_params))
    raw["loss"] = "mm"
    assert plugin_versions(raw) == {"longtail-mm": "0.1.0"}
    tags = tracking._run_tags(raw, "exp1", "abc123")  # what every stage run of it is tagged with
    assert tags["longtail.plugins"] == "longtail-mm 0.1.0" and tags["longtail.plugin.longtail-mm"] == "0.1.0"


def test_run_tags_are_strings_a_tracking_server_accepts(default_params):
    """Against `mlflow server` (the REST store) every SLURM job failed in build_dataset: the
    ratio and seed tags were numbers, and RunTag.to_proto refuses a non-string value ("bad argument
    type"); the sqlite store had converted them silently."""
    from mlflow.entities import RunTag

    from pipeline.tracking import _run_tags

    tags = _run_tags({**default_params, "ratio": 100.0, "seed": 3}, "g", "abc")
    assert tags["ratio"] == "100.0" and tags["seed"] == "3"
    for k, v in tags.items():
        RunTag(k, v).to_proto()  # what the REST store does with each tag


def test_a_reused_experiment_name_with_other_params_gets_runs_of_its_own(tmp_path, monkeypatch, default_params):
    """DVC lets a removed experiment's name be queued again. A Logit-adjust run named like an old cRT
    run was nested under the cRT parent (the parent's method, its stage names and its metrics would
    have mixed both); now it gets its own group, while the same params (a resumed run) rejoin theirs."""
    from mlflow.tracking import MlflowClient

    _use(monkeypatch, tmp_path, tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "c10y-0")
    crt = {**default_params, "loss": "ce", "finetune": {**default_params["finetune"], "strategy": "crt"}}
    la = {**default_params, "loss": "logit_adjust", "finetune": {**default_params["finetune"], "reweighting": "none"}}
    with tracking.stage_run("pretrain", crt):
        pass
    with tracking.stage_run("pretrain", la):
        pass
    with tracking.stage_run("finetune", la):
        pass
    client = MlflowClient(tracking.tracking_uri())
    exp = tracking.ensure_experiment()
    parents = client.search_runs([exp], "tags.`longtail.parent` = 'true'", order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    old, new = parents
    assert old.data.tags["longtail.group"] == "c10y-0" and old.data.params["loss"] == "ce"
    assert new.data.tags["longtail.group"].startswith("c10y-0~") and new.data.params["loss"] == "logit_adjust"
    stages = client.search_runs([exp], "tags.`longtail.stage` != ''")
    by_parent = sorted((r.data.tags["mlflow.parentRunId"] == new.info.run_id, r.info.run_name) for r in stages)
    group = new.data.tags["longtail.group"]
    assert by_parent == [(False, "c10y-0/pretrain"), (True, f"{group}/finetune"), (True, f"{group}/pretrain")]
    assert tracking.parent_summary("c10y-0")["method"] == "Logit-adjust"  # the newest of that name


def test_slurm_clean_up_of_a_killed_job_finds_the_runs_of_a_reused_name(tmp_path, monkeypatch, default_params):
    """A SLURM job killed mid-stage leaves its runs RUNNING, and the next attempt ends them
    (slurm.close_stale_runs, by DVC experiment name). When that name had been used before for other
    params, the killed job's runs are in the group `name~<digest>`: the clean-up looked only at the
    group `name`, so it left them RUNNING (and would have marked the old experiment's parent
    FINISHED when the new one finished)."""
    from mlflow.tracking import MlflowClient

    from pipeline import slurm

    _use(monkeypatch, tmp_path, tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "c10y-0")
    crt = {**default_params, "loss": "ce", "finetune": {**default_params["finetune"], "strategy": "crt"}}
    la = {**default_params, "loss": "logit_adjust", "finetune": {**default_params["finetune"], "reweighting": "none"}}
    with pytest.raises(KeyboardInterrupt):  # the old experiment: stopped, its parent KILLED
        with tracking.stage_run("pretrain", crt):
            raise KeyboardInterrupt
    killed_job = tracking.stage_run("pretrain", la)
    killed_job.__enter__()  # never exited: what a job killed by SIGKILL leaves behind
    client = MlflowClient(tracking.tracking_uri())
    exp = tracking.ensure_experiment()

    def statuses():
        runs = client.search_runs([exp], "", order_by=["attributes.start_time ASC"])
        return [(r.data.tags["longtail.group"].split("~")[0] + ("~" if "~" in r.data.tags["longtail.group"] else ""),
                 r.data.tags.get("longtail.stage", "parent"), r.info.status) for r in runs]

    assert statuses() == [("c10y-0", "parent", "KILLED"), ("c10y-0", "pretrain", "KILLED"),
                          ("c10y-0~", "parent", "RUNNING"), ("c10y-0~", "pretrain", "RUNNING")]
    assert slurm.close_stale_runs("c10y-0", tracking.DEFAULT_EXPERIMENT) == 2
    assert statuses() == [("c10y-0", "parent", "KILLED"), ("c10y-0", "pretrain", "KILLED"),
                          ("c10y-0~", "parent", "KILLED"), ("c10y-0~", "pretrain", "KILLED")]
    assert slurm.close_stale_runs("c10y-0", tracking.DEFAULT_EXPERIMENT, finished=True) == 1
    assert statuses()[:2] == [("c10y-0", "parent", "KILLED"), ("c10y-0", "pretrain", "KILLED")]
    assert statuses()[2] == ("c10y-0~", "parent", "FINISHED")


# -- a store or an experiment MLflow cannot use: one line, at once

def test_an_experiment_deleted_in_the_ui_is_named_with_how_to_go_on(tmp_path, monkeypatch, default_params):
    """Deleting the experiment in the MLflow UI broke every stage with MLflow's 'The experiment 1 must be in
    the 'active' state' traceback, and `longtail report` said there were no runs."""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import LongtailError

    _use(monkeypatch, tmp_path, tmp_path)
    uri = tracking.tracking_uri()
    exp_id = tracking.ensure_experiment()
    MlflowClient(uri).delete_experiment(exp_id)
    message = (f"the MLflow experiment 'longtail' is deleted in the store {uri}: restore it "
               f"(`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp_id}`) "
               "or set another tracking.experiment in params.yaml (`longtail report`: --experiment NAME)")
    with pytest.raises(LongtailError) as stage:
        with tracking.stage_run("build-dataset", default_params):
            pass
    with pytest.raises(LongtailError) as report:  # longtail report --experiment longtail
        tracking.finished_runs("evaluate", "longtail")
    assert str(stage.value) == str(report.value) == message
    assert MlflowClient(uri).search_runs([exp_id]) == []  # no run was started in it


def test_a_store_mlflow_cannot_open_fails_at_once(tmp_path, monkeypatch, default_params):
    """`mkdir mlflow.db` (or a store URI naming a folder): every stage and `longtail report` stalled for
    about 110 s while MLflow retried, printing some 40 warnings, then failed with a traceback."""
    import os
    import time
    from pathlib import Path

    from pipeline.errors import LongtailError

    _use(monkeypatch, tmp_path, tmp_path)
    (tmp_path / "mlflow.db").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.monotonic()
    for call in (tracking.ensure_experiment, tracking.finished_runs):  # a stage; longtail report
        with pytest.raises(LongtailError) as err:
            call()
        assert str(err.value) == f"the MLflow store {uri} is a directory, not a database file"
    assert time.monotonic() - start < 5
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    with pytest.raises(LongtailError) as err:
        tracking.ensure_experiment()
    assert str(err.value) == (f"the MLflow store sqlite:///{tmp_path / 'file' / 'mlflow.db'} cannot be made: "
                              f"{tmp_path / 'file'} is a file, not a folder")
    folder = tmp_path / "read-only"
    folder.mkdir()
    real = os.access  # the test runs as root in CI images, where no folder is read-only: ask access() instead
    monkeypatch.setattr(tracking.os, "access", lambda p, mode: real(p, mode) and Path(p) != folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    with pytest.raises(LongtailError) as err:
        tracking.ensure_experiment()
    assert str(err.value) == (f"the MLflow store sqlite:///{folder / 'mlflow.db'} cannot be written: "
                              f"its folder {folder} is not writable")
    assert sorted(p.name for p in folder.iterdir()) == []


def test_an_artifact_store_that_cannot_be_written_fails_the_stage_in_one_line(tmp_path, monkeypatch, default_params):
    """A file named mlartifacts where the artifact folder goes (or a full disk, a denied folder): log_artifact
    let MLflow's NotADirectoryError / OSError through as a traceback."""
    from mlflow.tracking import MlflowClient

    from pipeline.errors import LongtailError

    _use(monkeypatch, tmp_path, tmp_path)
    (tmp_path / "mlartifacts").write_text("")
    (tmp_path / "x.txt").write_text("x")
    for name, write in (("evaluation/x.txt", lambda log: log.log_artifact(tmp_path / "x.txt", "evaluation")),
                        ("evaluation/per_class_table.json",
                         lambda log: log.log_table({"class": [0]}, "evaluation/per_class_table.json"))):
        with pytest.raises(LongtailError) as err:
            with tracking.stage_run("evaluate", default_params) as log:
                write(log)
        exp_id = tracking.ensure_experiment()
        assert str(err.value) == (f"cannot write the artifact {name} to the MLflow artifact store "
                                  f"{tmp_path}/mlartifacts/{exp_id}/{log.run_id}/artifacts (Not a directory: "
                                  f"mlartifacts/{exp_id}): free or fix that location, or run the stage with --no-track")
        assert MlflowClient(tracking.tracking_uri()).get_run(log.run_id).info.status == "FAILED"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down_or_a_mistyped_store_uri_fails_at_once(tmp_path, monkeypatch, default_params):
    """MLFLOW_TRACKING_URI=http://127.0.0.1:1 (a server that is down): `longtail build-dataset` printed
    nothing for over four minutes while MLflow retried, with SIGTERM held back (store calls run shielded),
    then a traceback; `longtail report` the same. foo://bar gave MLflow's UnsupportedModelRegistryStoreURI
    traceback, and sqlite:////nonexistent/dir/m.db made that folder and a new, empty store there."""
    import socket
    import sys
    import time

    from testkit import clean_env

    from pipeline.errors import LongtailError

    import mlflow.tracking  # noqa: F401 - imported before the clock starts (seconds on a busy machine)

    _use(monkeypatch, tmp_path, tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(LongtailError) as stage:
        with tracking.stage_run("build-dataset", default_params):
            pass
    with pytest.raises(LongtailError) as report:
        tracking.finished_runs("evaluate", "longtail")
    assert time.monotonic() - start < 5
    reached = f"the MLflow server {uri} (MLFLOW_TRACKING_URI) cannot be reached (connection refused): "
    assert str(stage.value) == reached + "start it, fix MLFLOW_TRACKING_URI, or use --no-track"
    assert str(report.value) == reached + "start it, fix MLFLOW_TRACKING_URI"  # report has no --no-track
    # the CLI: one line, exit 2, at once
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-dataset"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180, env=clean_env(MLFLOW_TRACKING_URI=uri, LONGTAIL_ROOT=str(tmp_path)))
    assert (out.returncode, out.stderr) == (2, f"error: {reached}start it, fix MLFLOW_TRACKING_URI, or use --no-track\n")
    # a password in the URI is not shown; a proxy that requests would use is what is reached
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://me:secret@127.0.0.1:{_closed_port()}/mlflow")
    with pytest.raises(LongtailError, match=r"^the MLflow server https://me:\*\*\*@127\.0\.0\.1:\d+/mlflow "):
        tracking.ensure_experiment()
    with socket.socket() as server:  # a server that is up: the check lets MLflow go on
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        tracking._check_store(f"http://127.0.0.1:{port}")
        proxy = _closed_port()
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy}")
        monkeypatch.setenv("NO_PROXY", "")
        with pytest.raises(LongtailError) as err:
            tracking._check_store(f"http://127.0.0.1:{port}")
        assert f"cannot be reached through the proxy 127.0.0.1:{proxy} (connection refused)" in str(err.value)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        tracking._check_store(f"http://127.0.0.1:{port}")
        # ALL_PROXY alone (common on clusters): requests goes through it, so the check does too; a server
        # name only the proxy can resolve is not "unknown host"
        for key in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{port}")
        tracking._check_store("http://mlflow.internal.invalid:5000")
    # a URI of no store type; the ones MLflow opens pass the check
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    for call in (tracking.ensure_experiment, tracking.finished_runs):
        with pytest.raises(LongtailError) as err:
            call()
        assert str(err.value) == ("the MLflow store foo://bar (MLFLOW_TRACKING_URI) is of no store type MLflow opens "
                                  "(valid: a file path, file:///path, sqlite:///path.db, postgresql://, mysql://, "
                                  "mssql://, http(s)://host:port, databricks)")
    for ok in ("mlruns", str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri(), "postgresql+psycopg2://u@h/db",
               "databricks", "databricks://profile"):
        tracking._check_store(ok)
    # an sqlite store in a folder that does not exist: refused, nothing made
    missing = tmp_path / "no" / "such"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing / 'm.db'}")
    with pytest.raises(LongtailError) as err:
        tracking.ensure_experiment()
    assert str(err.value) == (f"the MLflow store sqlite:///{missing / 'm.db'} cannot be made: its folder {missing} "
                              "does not exist (create it, or fix MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "no").exists()
    assert tracking.finished_runs() == []  # reading: a store that does not exist is empty, as before
