"""Parallel sweeps: two queued DVC experiments running at the same time both log completely to
the one sqlite MLflow store (SQLite takes one writer at a time; the tracking layer retries)."""

import sqlite3
import time

import pytest

from .conftest import FAST, set_params, sh

pytestmark = pytest.mark.slow


def test_two_parallel_queued_experiments_lose_nothing(repo):
    # build the dataset once so that both experiments start training at the same moment
    sh(["dvc", "repro", "build_dataset", *[]], repo, check=False)
    for seed in (0, 1):
        sh(["dvc", "exp", "run", "--queue", "-n", f"par{seed}", *set_params(FAST), "-S", f"seed={seed}"], repo)
    sh(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    db = sqlite3.connect(repo / "mlflow.db")
    spans = db.execute("select r.start_time, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
                       "and t.key = 'longtail.stage' and t.value = 'pretrain'").fetchall()
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans), "the runs did not overlap"
    for name in ("par0", "par1"):
        runs = dict(db.execute(
            "select t2.value, r.run_uuid from runs r join tags t1 on t1.run_uuid = r.run_uuid and t1.key = 'longtail.group' "
            "join tags t2 on t2.run_uuid = r.run_uuid and t2.key = 'longtail.stage' where t1.value = ? "
            "and r.status = 'FINISHED'", (name,)).fetchall())
        assert set(runs) == {"pretrain", "finetune", "evaluate"} or set(runs) == {
            "build-dataset", "pretrain", "finetune", "evaluate"}, (name, runs)
        steps = [s for (s,) in db.execute("select step from metrics where run_uuid = ? and key = 'train_loss' "
                                           "order by step", (runs["pretrain"],))]
        assert steps == list(range(1, 7)), (name, steps)  # MLflow steps are epochs counted from 1
        steps = [s for (s,) in db.execute("select step from metrics where run_uuid = ? and key = 'test_acc' "
                                           "order by step", (runs["finetune"],))]
        assert steps == [7, 8], (name, steps)
        n_class = db.execute("select count(*) from metrics where run_uuid = ? and key like 'class_acc_final/%'",
                             (runs["evaluate"],)).fetchone()[0]
        assert n_class == 10
