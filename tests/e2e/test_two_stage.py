"""Two-stage and architecture methods end to end on the embedded digits data: cRT through
`dvc exp run`, then tau_norm, LWS and NCM on the same stage-1 checkpoint, Balanced Meta-Softmax and
BBN through the `longtail` stage commands in the same repo; every run's metrics read back from
MLflow."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.params import override

from .conftest import FAST, make_repo, mlflow_client, set_params, sh

pytestmark = pytest.mark.slow

EPOCHS = 4  # FAST's schedule, halved; decoupling's stage 1 covers all of it
STAGE2 = 2  # classifier-only epochs of crt / lws / meta_sampler
SHORT = [kv for kv in FAST if not kv.startswith(("train.epochs=", "finetune.start_epoch=", "train.milestones="))] + [
    f"train.epochs={EPOCHS}", f"finetune.start_epoch={EPOCHS}", "train.milestones=[2,3]"]


def _edit(repo: Path, changes: dict) -> None:
    raw = override(yaml.safe_load((repo / "params.yaml").read_text()), changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _stages(repo: Path, *stages: str) -> str:
    out = ""
    for stage in stages:
        res = sh(["longtail", stage], repo)
        out += res.stdout + res.stderr
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("twostage") / "repo")
    results, logs = {}, {}

    def record(name, text):
        m = json.loads((repo / "metrics/eval.json").read_text())
        state = torch.load(repo / "models/final.pt", map_location="cpu", weights_only=False)
        results[name] = {"eval": m, "head": state["meta"]["head"], "meta": state["meta"],
                         "history": [r["epoch"] for r in state["history"]]}
        logs[name] = text

    # decoupling, stage 1 = the whole schedule; cRT through the real `dvc exp run`
    out = sh(["dvc", "exp", "run", "-n", "crt", *set_params(SHORT), "-S", "finetune.strategy=crt", "-S", "finetune.reweighting=none",
              "-S", f"finetunes.crt.epochs={STAGE2}"], repo)
    record("crt", out.stdout + out.stderr)
    # the other classifier-stage strategies re-use the same stage-1 checkpoint (models/pretrain.pt)
    for name, extra in (("tau_norm", {"finetunes.tau_norm.tau": "auto"}),
                        ("lws", {"finetunes.lws.epochs": STAGE2}), ("ncm", {})):
        _edit(repo, {"finetune.strategy": name, **extra})
        record(name, _stages(repo, "finetune", "evaluate"))
    # Balanced Meta-Softmax: Balanced Softmax end to end, then the meta sampler
    _edit(repo, {"loss": "balanced_softmax", "finetune.strategy": "meta_sampler",
                 "finetunes.meta_sampler.iterations": STAGE2, "finetunes.meta_sampler.batch_size": 4096,
                 "finetunes.meta_sampler.meta_batch_size": 64})  # one step per epoch
    record("meta_sampler", _stages(repo, "pretrain", "finetune", "evaluate"))
    # BBN: the strategy runs the whole schedule (pretrain runs no epoch)
    _edit(repo, {"loss": "ce", "model.arch": "bbn_resnet32", "finetune.start_epoch": 0, "finetune.strategy": "bbn"})
    record("bbn", _stages(repo, "pretrain", "finetune", "evaluate"))
    return repo, results, logs


def _runs(repo: Path, strategy: str) -> dict:
    """The finetune and evaluate MLflow runs of the pipeline execution that used `strategy`."""
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    fin = [r for r in client.search_runs([exp.experiment_id], "tags.`longtail.stage` = 'finetune'")
           if r.data.params.get("finetune.strategy") == strategy]
    assert len(fin) == 1, f"{len(fin)} finetune runs for {strategy}"
    group = fin[0].data.tags["longtail.group"]
    ev = client.search_runs([exp.experiment_id],
                            f"tags.`longtail.group` = '{group}' and tags.`longtail.stage` = 'evaluate'")
    assert len(ev) == 1
    return {"finetune": fin[0], "evaluate": ev[0], "client": client}


@pytest.mark.parametrize("strategy", ["crt", "tau_norm", "lws", "ncm", "meta_sampler", "bbn"])
def test_each_strategy_runs_and_its_metrics_reach_mlflow(ran, strategy):
    repo, results, _ = ran
    res = results[strategy]
    m = res["eval"]
    assert 0.0 <= m["final"]["top1"] <= 1.0 and set(m["shots"]) == {"many", "medium", "few"}
    runs = _runs(repo, strategy)
    for stage in ("finetune", "evaluate"):
        assert runs[stage].info.status == "FINISHED"
    ev = runs["evaluate"].data.metrics
    assert ev["final_top1"] == pytest.approx(m["final"]["top1"])
    assert {f"class_acc_final/{i:03d}" for i in range(10)} <= set(ev)


def test_classifier_stages_add_epochs_after_stage_one(ran):
    repo, results, _ = ran
    for name in ("crt", "lws", "meta_sampler"):
        res = results[name]
        assert res["eval"]["final"]["epoch"] == EPOCHS + STAGE2, name  # epochs counted from 1
        assert res["history"] == list(range(EPOCHS + STAGE2)), name
        # best-epoch tracking restarted with the new classifier
        assert EPOCHS < res["eval"]["best"]["epoch"] <= EPOCHS + STAGE2, name
        runs = _runs(repo, name)
        steps = [h.step for h in runs["client"].get_metric_history(runs["finetune"].info.run_id, "test_acc")]
        assert steps == [EPOCHS + 1, EPOCHS + 2], name
    for name in ("tau_norm", "ncm"):  # no training: the final model is the best one, at the stage-1 end
        res = results[name]
        assert res["eval"]["final"]["epoch"] == res["eval"]["best"]["epoch"] == EPOCHS
        assert res["eval"]["best"]["top1"] == res["eval"]["final"]["top1"]


def test_the_new_heads_are_what_evaluate_rebuilt(ran):
    _, results, _ = ran
    assert results["crt"]["head"] == "linear" and results["lws"]["head"] == "linear"
    assert results["tau_norm"]["head"] == "linear_nobias" and results["ncm"]["head"] == "ncm"
    assert results["bbn"]["meta"]["arch"] == "bbn_resnet32"


def test_method_specific_metrics(ran):
    repo, results, logs = ran
    # tau_norm: the sweep over the training subset, logged per tau and kept in the checkpoint
    runs = _runs(repo, "tau_norm")
    client, run_id = runs["client"], runs["finetune"].info.run_id
    sweep = client.get_metric_history(run_id, "tau_sweep/balanced_acc")
    assert sorted(h.step for h in sweep) == [10 * i for i in range(21)]  # tau in [0, 2], step 0.1
    chosen = results["tau_norm"]["meta"]["tau_norm"]
    assert runs["finetune"].data.metrics["tau"] == pytest.approx(chosen["tau"])
    assert chosen["tau"] == max(r["tau"] for r in chosen["sweep"]
                                if r["balanced_acc"] >= max(s["balanced_acc"] for s in chosen["sweep"]) - 1e-12)
    assert "-> tau = " in logs["tau_norm"] and (repo / ".longtail/tau_sweep.json").exists()
    # lws: one scale per class
    lws = _runs(repo, "lws")["finetune"].data.metrics
    assert {f"lws_scale/{j:03d}" for j in range(10)} <= set(lws)
    # meta_sampler: learned class rates per epoch, a distribution
    runs = _runs(repo, "meta_sampler")
    rates = [runs["finetune"].data.metrics[f"sampler_rate/{j:03d}"] for j in range(10)]
    assert sum(rates) == pytest.approx(1.0, abs=1e-5)
    assert results["meta_sampler"]["meta"]["loss"] == "balanced_softmax"
    # bbn: alpha = 1 - (T / T_max)^2 per epoch, test accuracy every epoch of the whole schedule
    runs = _runs(repo, "bbn")
    alpha = runs["client"].get_metric_history(runs["finetune"].info.run_id, "bbn_alpha")
    assert [(h.step, h.value) for h in sorted(alpha, key=lambda h: h.step)] == \
        [(e + 1, pytest.approx(1 - (e / EPOCHS) ** 2)) for e in range(EPOCHS)]
    acc = runs["client"].get_metric_history(runs["finetune"].info.run_id, "test_acc")
    assert sorted(h.step for h in acc) == list(range(1, EPOCHS + 1))
    assert results["bbn"]["history"] == list(range(EPOCHS))


def test_crt_went_through_dvc(ran):
    repo, _, logs = ran
    assert "Running stage 'finetune'" in logs["crt"]
    assert f"finetune[crt] epoch {EPOCHS + STAGE2}/{EPOCHS + STAGE2}" in logs["crt"]
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    assert "crt" in json.dumps(shown)
