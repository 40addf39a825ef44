"""Any number of processes may create the MLflow store and experiment at once."""

import multiprocessing
import os

import pytest

from pipeline import tracking

REPS = int(os.environ.get("LONGTAIL_STORE_RACE_REPS", "1"))  # 10 for a thorough check


def _start(uri, barrier, errors):
    os.environ["MLFLOW_TRACKING_URI"] = uri
    barrier.wait()
    try:
        tracking.ensure_experiment("race")
    except Exception as exc:  # report, then fail the child
        errors.put(f"{type(exc).__name__}: {exc}"[:300])
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("rep", range(REPS))
def test_four_processes_start_on_a_new_store_at_once(tmp_path, rep):
    import mlflow.tracking  # noqa: F401  imported before the fork: the children only race on the store

    ctx = multiprocessing.get_context("fork")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(uri, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    msgs = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], msgs
    from mlflow.tracking import MlflowClient

    assert len([e for e in MlflowClient(uri).search_experiments() if e.name == "race"]) == 1


def test_a_run_left_running_by_a_kill_is_marked_killed_on_resume(tmp_path, monkeypatch):
    """The resumed stage's run replaces the killed one (which it re-logs, see test_training)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-killed")
    raw = {"dataset": "digits", "loss": "ce"}
    killed = tracking.stage_run("pretrain", raw)
    killed.__enter__()  # a kill -9 never runs the exit
    with tracking.stage_run("pretrain", raw) as run:
        pass
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("longtail").experiment_id],
                              filter_string="tags.`longtail.stage` = 'pretrain'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert {r.info.run_id for r in runs if r.info.status == "FINISHED"} == {run.run_id}


_CHILD = """
import sys, time
from pipeline import tracking
run = tracking.stage_run("pretrain", {"dataset": "digits", "loss": "ce"})
handle = run.__enter__()
print(handle.run_id, handle.parent.run_id, flush=True)
time.sleep(600)
"""


def test_a_run_left_running_by_a_dead_process_is_ended_by_the_next_pipeline_run(tmp_path, monkeypatch):
    """A stage killed (kill -9, OOM, a closed session) before its first resume checkpoint, then re-run
    as a new DVC experiment (a new group), used to stay RUNNING for ever with its parent. The next
    stage started on this machine ends them KILLED; a live process's runs, and another machine's, it
    leaves alone."""
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "DVC_EXP_NAME": "exp-killed"})
    try:
        dead_run, dead_parent = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-live")  # a live run of this process, in another group
    live = tracking.stage_run("pretrain", {"dataset": "digits", "loss": "ce"})
    live_run = live.__enter__()
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("longtail").experiment_id
    remote = client.create_run(exp_id, tags={tracking.GROUP_TAG: "exp-remote", "longtail.stage": "pretrain",
                                             tracking.PROCESS_TAG: "node-17 4026531836 123 456"}).info.run_id
    monkeypatch.setenv("DVC_EXP_NAME", "exp-rerun")
    with tracking.stage_run("pretrain", {"dataset": "digits", "loss": "ce"}):
        pass
    status = {rid: client.get_run(rid).info.status
              for rid in (dead_run, dead_parent, live_run.run_id, live_run.parent.run_id, remote)}
    assert status == {dead_run: "KILLED", dead_parent: "KILLED", live_run.run_id: "RUNNING",
                      live_run.parent.run_id: "RUNNING", remote: "RUNNING"}
    live.__exit__(None, None, None)


def test_the_process_tag_tells_a_reused_pid_from_its_first_owner():
    import subprocess

    proc = subprocess.Popen(["sleep", "30"])
    try:
        tag = tracking._process(proc.pid)
        assert not tracking._process_gone(tag)
        host, ns, pid, start = tag.split(" ")
        if start != "-":  # the same pid, started at another time: another process
            assert tracking._process_gone(f"{host} {ns} {pid} {int(start) - 1}")
        assert not tracking._process_gone(f"{host} {int(ns) + 1 if ns.isdigit() else 'x'} {pid} {start}")
    finally:
        proc.kill()
        proc.wait()
    assert tracking._process_gone(tag)


def test_an_interrupted_stage_ends_killed_with_its_parent(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (which cli.main raises as a KeyboardInterrupt) is a stop, not a failure:
    the stage run and its parent end KILLED, not FAILED, and never stay RUNNING."""
    from mlflow.tracking import MlflowClient

    from pipeline.interrupts import Terminated

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-stopped")
    with pytest.raises(Terminated):
        with tracking.stage_run("pretrain", {"dataset": "digits", "loss": "ce"}):
            raise Terminated()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("longtail").experiment_id])
    assert sorted((r.data.tags.get("longtail.parent", "stage"), r.info.status) for r in runs) == \
        [("stage", "KILLED"), ("true", "KILLED")]



def test_a_sigterm_during_a_store_write_is_raised_after_it(tmp_path, monkeypatch):
    """SIGTERM used to be raised wherever the process was, also inside an MLflow write: the write's
    sqlite transaction stayed open, and the stage's clean-up (ending its runs KILLED) then waited on
    "database is locked" for minutes (a CI run timed out after 300 s). Now a write runs whole and the
    signal is raised when it returns: the metric is stored and both runs end KILLED."""
    import signal

    from mlflow.tracking import MlflowClient

    from pipeline import interrupts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-sigterm")
    interrupts.install()  # tests/conftest.py puts the worker's handlers back
    with pytest.raises(interrupts.Terminated):
        with tracking.stage_run("pretrain", {"dataset": "digits", "loss": "ce"}) as log:
            write = log.client.log_batch

            def signalled_write(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives as the write starts
                return write(*args, **kwargs)

            monkeypatch.setattr(log.client, "log_batch", signalled_write)
            log.log_metrics({"train_loss": 1.5}, step=1)
            raise AssertionError("SIGTERM was not raised after the write")
    assert interrupts.terminated()  # cli.main exits 143 on it
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("longtail").experiment_id])
    assert sorted((r.data.tags.get("longtail.parent", "stage"), r.info.status) for r in runs) == \
        [("stage", "KILLED"), ("true", "KILLED")]
    stage = next(r for r in runs if "longtail.parent" not in r.data.tags)
    assert stage.data.metrics == {"train_loss": 1.5}


@pytest.mark.parametrize("call", ["create_run", "log_batch", "set_terminated"])
def test_a_sigterm_while_the_runs_are_set_up_or_ended_leaves_none_running(tmp_path, monkeypatch, call):
    """A stop that arrives while stage_run creates its runs (before the stage starts) or ends them (the
    clean-up) still leaves the stage run and its parent ended, not RUNNING (the last stage, evaluate:
    after an earlier one that finishes the parent stays RUNNING by design)."""
    import signal

    from mlflow.tracking import MlflowClient

    from pipeline import interrupts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", f"exp-{call}")
    client = MlflowClient(uri)
    real = getattr(client, call)
    sent = []

    def signalled(*args, **kwargs):
        if not sent:
            sent.append(call)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "client_and_experiment",
                        lambda name, **_: (client, tracking._experiment_id(client, name)))
    monkeypatch.setattr(client, call, signalled)
    interrupts.install()
    with pytest.raises(interrupts.Terminated):
        with tracking.stage_run("evaluate", {"dataset": "digits", "loss": "ce"}):
            pass
    assert sent == [call]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("longtail").experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]


def test_a_signal_inside_a_shielded_block_that_fails_is_not_lost():
    """The block ends with an error: the held-back signal is raised all the same (the process is being
    stopped); it used to stay pending, with a second SIGTERM ignored, so the stage ran on."""
    import signal

    from pipeline import interrupts

    interrupts.install()
    with pytest.raises(interrupts.Terminated):
        with interrupts.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ValueError("a store call that fails")
    assert not interrupts._pending


def test_ctrl_c_inside_a_shielded_block_waits_for_its_end_and_a_second_does_not():
    import signal

    from pipeline import interrupts

    signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist workers start with SIGINT ignored
    interrupts.install()
    done = []
    with pytest.raises(KeyboardInterrupt) as caught:
        with interrupts.shielded():
            with interrupts.shielded():  # nested: raised at the outermost end only
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner")
            done.append("outer")
    assert not isinstance(caught.value, interrupts.Terminated)
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C inside a block: at once
        with interrupts.shielded():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("held")
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done[-1] == "held" and not interrupts._pending
    with pytest.raises(KeyboardInterrupt):  # outside a block: at once
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


def test_a_process_started_ignoring_sigint_keeps_ignoring_it():
    import signal

    from pipeline import interrupts

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupts.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is interrupts._handle
