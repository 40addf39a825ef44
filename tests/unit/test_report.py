"""`longtail report` and `longtail sweep` without training: aggregation maths on runs written to a
throwaway MLflow store, method naming, the published-figure comparison, the table's shape, the
figures, the sweep grid and its validation, and the offline `dvc plots show` page."""

import csv
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit import ROOT, clean_env, project_params

from pipeline import figures, report, sweep
from pipeline.engine.metrics import sample_margins
from pipeline.errors import LongtailError
from pipeline.params import override
from pipeline.tracking import _flatten

PNG = b"\x89PNG\r\n\x1a\n"


def flat(raw: dict, **overrides) -> dict:
    """params.yaml as MLflow logs it (flattened, values as strings), with dotted overrides."""
    return {k: str(v) for k, v in _flatten(override(raw, overrides)).items()}


def run(params: dict, metrics: dict, group: str = "g", start: int = 0, run_id: str = "") -> dict:
    return {"run_id": run_id or f"{group}-{start}", "group": group, "start_time": start, "params": params,
            "metrics": metrics, "tags": {"longtail.group": group}}


# ------------------------------------------------------------------------------------ naming

@pytest.fixture(scope="module")
def names():
    return report.MethodNames.load()


@pytest.mark.parametrize("overrides, expected", [
    ({"loss": "ce", "finetune.reweighting": "none"}, "ERM"),
    ({"loss": "ce", "finetune.reweighting": "cb"}, "ERM-DRW"),
    ({"loss": "ldam", "finetune.reweighting": "cb"}, "LDAM-DRW"),
    ({"loss": "ldam", "finetune.reweighting": "none"}, "LDAM"),
    ({"loss": "mm", "losses.mm.variant": "hmm", "finetune.reweighting": "cb"}, "HMM-DRW"),
    ({"loss": "mm", "losses.mm.variant": "hmm_ldam", "losses.mm.s": 26.0, "finetune.reweighting": "cb"},
     "HMM-LDAM-DRW"),
    ({"loss": "mm", "losses.mm.as_released": True, "finetune.reweighting": "cb"}, "MM-as-released-DRW"),
    # HMM-LDAM is named at the authors' HMM-LDAM scale only (s 26); at the HMM scale (s 19) it is a
    # run of its own, which the report labels with the params it differs in
    ({"loss": "mm", "losses.mm.variant": "hmm_ldam", "finetune.reweighting": "cb"}, "mm+DRW:cb"),
    ({"loss": "mm", "losses.mm.variant": "hmm_ldam", "losses.mm.s": 26.0, "finetune.reweighting": "none"},
     "HMM-LDAM"),
    ({"loss": "ce", "train.reweighting": "cb", "finetune.reweighting": "cb"}, "CB-RW"),
    ({"loss": "ce", "train.sampler": "class_balanced", "finetune.sampler": "class_balanced",
      "finetune.reweighting": "none"}, "CB-RS"),
    ({"loss": "ce", "finetune.sampler": "class_balanced", "finetune.reweighting": "none"}, "ERM-DRS"),
    ({"loss": "focal", "finetune.reweighting": "none"}, "Focal"),
    ({"loss": "sigmoid_focal", "train.reweighting": "cb", "finetune.reweighting": "cb"}, "CB-Focal"),
    # the LDAM-DRW code's softmax focal with CB weights is not the method of the published CB-Focal figures
    ({"loss": "focal", "train.reweighting": "cb", "finetune.reweighting": "cb"}, "focal+RW:cb+DRW:cb"),
    ({"loss": "am", "finetune.reweighting": "cb"}, "M-DRW"),
    # no named method: the readable fallback names every re-balancing choice that is not plain
    ({"loss": "focal", "train.reweighting": "inverse", "finetune.reweighting": "cb"}, "focal+RW:inverse+DRW:cb"),
    ({"loss": "ldam", "train.sampler": "sqrt", "finetune.reweighting": "none"}, "ldam+RS:sqrt"),
    ({"loss": "ce", "train.sampler": "class_balanced", "finetune.reweighting": "cb"}, "ce+RS:class_balanced+DRW:cb"),
])
def test_method_names_from_logged_params(names, default_params, overrides, expected):
    assert names.name(flat(default_params, **overrides)) == expected


def test_plugin_params_a_run_did_not_log_take_the_plugin_defaults(names, default_params):
    params = flat(default_params, loss="mm")
    for k in [k for k in params if k.startswith("losses.mm.")]:
        del params[k]
    assert names.name(params) == "HMM-DRW"  # variant hmm, as_released false: the plugin's defaults
    params["losses.mm.variant"] = "hmm_ldam"
    assert names.name(params) == "mm+DRW:cb"  # s 19, the plugin's default: not the HMM-LDAM setting


def test_a_run_is_named_by_the_epochs_its_schedule_trains(names, default_params):
    """BBN's milestones were written [119, 159] before they followed the authors' pinned PyTorch
    ([120, 160], docs/methods.md §4). Under schedule short both are epochs 18 and 24, so such a run
    trained BBN and is named BBN; under the full schedule it trained another lr step and is not."""
    bbn = names.full("BBN")
    assert bbn["train.milestones"] == [120, 160]
    old = {**bbn, "train.milestones": [119, 159]}
    assert names.name(flat(default_params, schedule="short", **old)) == "BBN"
    assert names.name(flat(default_params, **old)) == "ce+FT:bbn"
    assert names.name(flat(default_params, schedule="short", **{**bbn, "train.milestones": [110, 159]})) == "ce+FT:bbn"
    # every schedule-scaled key: cRT's stage 1 written 199 epochs long runs 30 under short, as 200 does
    assert names.name(flat(default_params, schedule="short", **{**names.full("cRT"), "finetune.start_epoch": 199})) == "cRT"
    assert names.name(flat(default_params, **{**names.full("cRT"), "finetune.start_epoch": 199})) != "cRT"


def test_every_method_names_itself_and_no_two_coincide(names, default_params):
    from pipeline import registry

    fulls = {}
    installed = {g: registry.names(g) for g in ("losses", "reweighting", "samplers")}
    for m in names.methods:
        full = names.full(m["name"])
        key = tuple(sorted((k, str(report.norm(v))) for k, v in full.items()))
        assert key not in fulls, f"{m['name']} and {fulls.get(key)} are the same params"
        fulls[key] = m["name"]
        params = flat(default_params, **full)
        assert names.name(params) == m["name"]
        # and every plugin the mapping names is installed
        assert full["loss"] in installed["losses"]
        for k in ("train.reweighting", "finetune.reweighting"):
            assert full[k] in installed["reweighting"]
        for k in ("train.sampler", "finetune.sampler"):
            assert full[k] in installed["samplers"]


def test_method_table_markdown(names):
    md = names.markdown().splitlines()
    assert md[0].startswith("| method |") and len(md) == 2 + len(names.methods)
    assert any(line.startswith("| HMM-DRW | `loss=mm`") for line in md)


# ------------------------------------------------------------------------ aggregation (MLflow)

# raw values of two methods x two settings; ERM-DRW cifar10 exp 100 has three seeds, one re-run twice
RAW = {
    ("ERM-DRW", "cifar10", "exp", 100): {0: 0.2514, 1: 0.2611, 2: 0.2480},
    ("ERM-DRW", "cifar10", "exp", 10): {0: 0.1312},
    ("LDAM-DRW", "cifar10", "exp", 100): {0: 0.2297, 1: 0.2350},
    ("LDAM-DRW", "cifar100", "step", 100): {0: 0.5464, 1: 0.5570},
}
LOSS = {"ERM-DRW": "ce", "LDAM-DRW": "ldam"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A throwaway sqlite store holding evaluate runs (and runs the report must ignore)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import StageRun

    default = project_params()
    path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("longtail", artifact_location=(path / "artifacts").as_uri())

    def log(params, metrics, stage="evaluate", status="FINISHED", group="g"):
        r = client.create_run(exp, tags={"longtail.stage": stage, "longtail.group": group})
        handle = StageRun(client, r.info.run_id)
        handle.log_params(params)
        handle.log_metrics(metrics)
        client.set_terminated(r.info.run_id, status)

    for (method, ds, prof, ratio), seeds in RAW.items():
        for seed, err in seeds.items():
            params = flat(default, loss=LOSS[method], dataset=ds, imbalance=prof, ratio=ratio, seed=seed)
            metrics = {"best_error": err, "final_error": err + 0.01, "final_top1": 1 - err - 0.01,
                       "final_many": 0.9 - seed / 100, "final_medium": 0.7, "final_few": 0.5 + seed / 100,
                       **{f"class_acc_final/{i:03d}": 1 - err - i / 100 for i in range(3)}}
            if (method, ds, seed) == ("ERM-DRW", "cifar10", 1) and ratio == 100:
                log(params, {**metrics, "best_error": 0.99}, group="old")  # an older re-run: left out
            log(params, metrics, group=f"{method}-{seed}")
    noise = flat(default, dataset="cifar10", imbalance="exp", ratio=100, seed=7)
    log(noise, {"best_error": 0.5}, status="FAILED")  # failed: left out
    log(noise, {"best_error": 0.5}, stage="pretrain")  # not an evaluate run: left out
    return uri


@pytest.fixture
def stored_runs(store, monkeypatch):
    from pipeline.tracking import finished_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return finished_runs("evaluate", "longtail")


def test_finished_runs_reads_only_finished_evaluate_runs(stored_runs):
    assert len(stored_runs) == sum(len(s) for s in RAW.values()) + 1  # + the older re-run
    assert all(r["params"]["loss"] in ("ce", "ldam") for r in stored_runs)


def test_aggregation_mean_std_n_over_seeds(stored_runs):
    t = report.build_table(stored_runs)
    assert t.rows == ["ERM-DRW", "LDAM-DRW"]
    assert [report.column_label(c) for c in t.columns] == ["cifar10 exp 100", "cifar10 exp 10", "cifar100 step 100"]
    for (method, ds, prof, ratio), seeds in RAW.items():
        cell = t.cells[(method, (ds, prof, float(ratio)))]
        values = [100 * v for v in seeds.values()]
        mean, std, n = cell.stat("best_error")
        assert n == len(values) and cell.seeds == sorted(seeds)
        assert mean == pytest.approx(statistics.fmean(values))
        assert std == (pytest.approx(statistics.stdev(values)) if n > 1 else None)
        assert cell.stat("final_error")[0] == pytest.approx(statistics.fmean(values) + 1)
    erm = t.cells[("ERM-DRW", ("cifar10", "exp", 100.0))]
    assert erm.replaced == 1 and 99.0 not in [100 * r["metrics"]["best_error"] for r in erm.runs]
    assert erm.stat("final_few")[0] == pytest.approx(100 * statistics.fmean([0.50, 0.51, 0.52]))


def test_markdown_and_csv_shape(stored_runs, tmp_path):
    res = report.generate(stored_runs, tmp_path, source="test store")
    md = (tmp_path / "table.md").read_text()
    t = res["table"]
    for title in ("## Top-1 error (%), best epoch", "## Top-1 error (%), final epoch",
                  "## Many / medium / few-shot accuracy (%), final epoch"):
        assert title in md
    best = md.split("## Top-1 error (%), best epoch")[1].split("##")[0]
    lines = [line for line in best.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | cifar10 exp 100 | cifar10 exp 10 | cifar100 step 100 |"
    assert len(lines) == 2 + 2 and all(line.count("|") == 5 for line in lines)
    v = [100 * x for x in RAW[("ERM-DRW", "cifar10", "exp", 100)].values()]
    assert lines[2] == (f"| ERM-DRW | {statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f} (n=3) | 13.12 (n=1) | — |")
    a, b = [100 * x for x in RAW[("LDAM-DRW", "cifar10", "exp", 100)].values()], \
        [100 * x for x in RAW[("LDAM-DRW", "cifar100", "step", 100)].values()]
    assert lines[3] == (f"| LDAM-DRW | {statistics.fmean(a):.2f} ± {statistics.stdev(a):.2f} (n=2) | — | "
                        f"{statistics.fmean(b):.2f} ± {statistics.stdev(b):.2f} (n=2) |")
    with open(tmp_path / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(RAW) == sum(1 for c in t.cells.values())
    r = next(r for r in rows if r["label"] == "ERM-DRW" and r["ratio"] == "100")
    assert (r["method"], r["dataset"], r["imbalance"], r["n"], r["seeds"]) == ("ERM-DRW", "cifar10", "exp", "3", "0 1 2")
    assert float(r["best_error_mean"]) == pytest.approx(statistics.fmean(v), abs=1e-4)
    assert float(r["best_error_std"]) == pytest.approx(statistics.stdev(v), abs=1e-4)


def test_runs_differing_in_other_params_get_separate_rows(default_params):
    runs = [run(flat(default_params, seed=s, **{"train.epochs": e}), {"best_error": 0.3}, start=s + e)
            for s in (0, 1) for e in (8, 200)]
    runs += [run(flat(default_params, seed=2, **{"losses.ldam.s": 10.0}), {"best_error": 0.3}, start=99)]
    t = report.build_table(runs)
    assert sorted(t.rows) == ["ERM-DRW [train.epochs=200]", "ERM-DRW [train.epochs=8]"]
    assert len(t.cells[("ERM-DRW [train.epochs=8]", ("cifar10", "exp", 100.0))].runs) == 2
    merged = report.build_table(runs, ignore=["train.epochs"])  # --ignore train.epochs
    assert merged.rows == ["ERM-DRW"] and merged.cells[("ERM-DRW", ("cifar10", "exp", 100.0))].seeds == [0, 1, 2]
    only = report.build_table(runs, where=report.parse_where(["train.epochs=8"]))
    assert only.rows == ["ERM-DRW"] and len(only.runs) == 2
    # KEY!=VALUE leaves runs out (e.g. one held-back run: --where longtail.dvc_exp!=NAME)
    without = report.build_table(runs, where=report.parse_where(["train.epochs!=8", "seed != 2"]))
    assert without.rows == ["ERM-DRW"] and len(without.runs) == 2
    assert sorted((r["params"]["train.epochs"], r["params"]["seed"]) for r in without.runs) == [("200", "0"), ("200", "1")]
    with pytest.raises(LongtailError, match=r"--where takes KEY=VALUE or KEY!=VALUE .*got '!=8'"):
        report.parse_where(["!=8"])


def test_a_where_key_that_no_run_has_is_named_with_the_closest_one(default_params, tmp_path):
    """`longtail report --where train.epoch=4` (a misspelled key) said `no finished evaluate runs match
    --where ...: run experiments first`, as if the filter had been right and the runs were missing."""
    runs = [run(flat(default_params, seed=s), {"best_error": 0.3}, start=s) for s in (0, 1)]
    for where, message in ((["train.epoch=4"], "--where train.epoch: no run in the store has the key 'train.epoch' "
                                               "(did you mean train.epochs?)"),
                           (["seed=0", "zzz!=1"], "--where zzz: no run in the store has the key 'zzz' (a param, a "
                                                  "tag or 'method' of the runs)")):
        with pytest.raises(LongtailError) as err:
            report.generate(runs, tmp_path / "r", where=report.parse_where(where))
        assert str(err.value) == message
    assert not (tmp_path / "r").exists()
    # a key the runs have (a param, a tag, the method) with no run at that value: the runs are missing
    for where in ("train.epochs=4", "longtail.group=x", "method=LDAM"):
        with pytest.raises(LongtailError, match=r"^no finished evaluate runs match --where in the store"):
            report.generate(runs, tmp_path / "r", where=report.parse_where([where]))
    assert len(report.build_table(runs, where=report.parse_where(["method=ERM-DRW"])).runs) == 2


def test_a_run_logged_before_a_param_existed_shares_the_cell_of_runs_at_its_default(default_params):
    """data.image_size came after the CIFAR-10-LT runs: a second seed logged with `auto` must join the
    first seed's cell (logged without the key), not become a row of its own; another size is its own row."""
    old = flat(default_params, seed=0)
    del old["data.image_size"]
    runs = [run(old, {"best_error": 0.3}, start=0), run(flat(default_params, seed=1), {"best_error": 0.2}, start=1),
            run(flat(default_params, seed=0, **{"data.image_size": 32}), {"best_error": 0.4}, start=2)]
    t = report.build_table(runs)
    assert sorted(t.rows) == ["ERM-DRW [data.image_size=32]", "ERM-DRW [data.image_size=auto]"]
    assert t.cells[("ERM-DRW [data.image_size=auto]", ("cifar10", "exp", 100.0))].seeds == [0, 1]
    assert report.build_table(runs[:2]).rows == ["ERM-DRW"]  # nothing to tell apart: no bracket


def test_runs_from_before_train_nesterov_share_a_cell_with_runs_logged_at_its_default(default_params):
    """train.nesterov came after the first CIFAR-10-LT runs: a run logged with False joins the runs
    logged without the key; a Nesterov run is a row of its own."""
    old = flat(default_params, seed=0)
    del old["train.nesterov"]
    runs = [run(old, {"best_error": 0.3}, start=0), run(flat(default_params, seed=1), {"best_error": 0.2}, start=1)]
    t = report.build_table(runs)
    assert t.rows == ["ERM-DRW"] and t.cells[("ERM-DRW", ("cifar10", "exp", 100.0))].seeds == [0, 1]
    runs.append(run(flat(default_params, seed=0, **{"train.nesterov": True}), {"best_error": 0.4}, start=2))
    assert sorted(report.build_table(runs).rows) == ["ERM-DRW [train.nesterov=False]", "ERM-DRW [train.nesterov=True]"]


def test_every_row_states_where_it_differs_from_the_common_settings(default_params, tmp_path):
    """ERM-DRW at 8 epochs next to LDAM-DRW / HMM-DRW at 12 must not read as a method effect."""
    mm = {"loss": "mm", "losses.mm.variant": "hmm", "losses.mm.as_released": False}
    runs = [run(flat(default_params, seed=0, **{"train.epochs": 8}), {"best_error": 0.3}, start=1),
            run(flat(default_params, seed=0, loss="ldam", **{"train.epochs": 12}), {"best_error": 0.3}, start=2),
            run(flat(default_params, seed=0, **mm, **{"train.epochs": 12}), {"best_error": 0.3}, start=3)]
    t = report.build_table(runs)
    assert t.rows == ["ERM-DRW [train.epochs=8]", "LDAM-DRW", "HMM-DRW"]
    assert t.common == {"train.epochs": 12.0}
    report.generate(runs, tmp_path)
    assert "common settings: train.epochs=12." in (tmp_path / "table.md").read_text()


def test_a_row_no_method_names_states_what_sets_its_loss_s_named_methods_apart(default_params, tmp_path):
    """An MM run with the HMM-LDAM variant at the HMM scale (s 19) is neither HMM-DRW nor HMM-LDAM-DRW
    (s 26): its row must say the variant and s, not read as a bare "mm+DRW:cb"."""
    mm = {"loss": "mm", "losses.mm.as_released": False}
    runs = [run(flat(default_params, seed=0, **mm, **{"losses.mm.variant": "hmm"}), {"best_error": 0.3}, start=1),
            run(flat(default_params, seed=0, **mm, **{"losses.mm.variant": "hmm_ldam", "losses.mm.s": 26.0}),
                {"best_error": 0.3}, start=2),
            run(flat(default_params, seed=0, **mm, **{"losses.mm.variant": "hmm_ldam"}), {"best_error": 0.3}, start=3)]
    t = report.build_table(runs)
    assert t.rows == ["HMM-DRW", "HMM-LDAM-DRW",
                      "mm+DRW:cb [losses.mm.as_released=False, losses.mm.s=19.0, losses.mm.variant=hmm_ldam]"]
    assert t.common == {}  # they are the row's own, not settings the other rows share
    report.generate(runs, tmp_path)
    assert "also states the loss params that tell it from" in (tmp_path / "table.md").read_text()


def test_each_row_states_the_hyper_parameters_of_its_plugins(stored_runs, tmp_path):
    """The table says which loss hyper-parameters a row ran with (e.g. MM's s, max_m, gamma),
    and only those of the plugins the row selected."""
    report.generate(stored_runs, tmp_path)
    section = (tmp_path / "table.md").read_text().split("## Hyper-parameters of each row")[1]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    ldam = lines["LDAM-DRW"]
    assert "losses.ldam: max_m=0.5, s=30" in ldam and "reweightings.cb: beta=0.9999" in ldam
    assert "losses.focal" not in ldam and "losses.mm" not in ldam and "finetunes." not in ldam
    assert "losses.ldam" not in lines["ERM-DRW"] and "reweightings.cb: beta=0.9999" in lines["ERM-DRW"]


def test_no_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(LongtailError, match="no finished evaluate runs"):
        report.generate([], tmp_path)


def test_an_out_that_is_a_file_is_named_before_any_work(stored_runs, tmp_path, monkeypatch):
    """`longtail report -o params.yaml` gave a FileExistsError traceback from out.mkdir, after the tables
    were built; it is refused first (with no runs too), and nothing is written."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("seed: 0\n")
    for out, message in ((Path("params.yaml"), "--out params.yaml is a file, not a folder"),
                         (Path("params.yaml/r"), "--out params.yaml/r: params.yaml is a file, not a folder")):
        for runs in (stored_runs, []):
            with pytest.raises(LongtailError) as err:
                report.generate(runs, out)
            assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    assert Path("params.yaml").read_text() == "seed: 0\n"


def test_an_out_the_os_refuses_is_one_line(stored_runs):
    """Fault injection: `longtail report -o /proc/x` gave a FileNotFoundError traceback from out.mkdir."""
    with pytest.raises(LongtailError, match=r"^cannot write /proc/x/?: No such file or directory$"):
        report.generate(stored_runs, Path("/proc/x"))


# ---------------------------------------------------------------------------------- published

def test_published_figures_have_citations_and_known_names(names):
    pub = report.Published.load()
    assert set(pub.sources) == {f["source"] for f in pub.figures}
    assert all(f["method"] in names.names or f["method"] == "BBN" for f in pub.figures)
    look = pub.lookup()
    assert look[("LDAM-DRW", "cifar10 exp 100")]["error"] == 22.97
    assert look[("ERM-DRW", "cifar100 step 10")]["error"] == 42.78
    assert look[("HMM-DRW", "cifar10 step 100")]["error"] == pytest.approx(100 - 77.17)  # given as accuracy
    assert look[("LDAM-DRW", "cifar10 step 100")]["source"] == "cao2019"  # Table 2 listed before the dev logs
    assert len([f for f in pub.figures if f["source"] == "cao2019"]) == 8 * 8


def test_published_difference(stored_runs, tmp_path):
    t = report.build_table(stored_runs)
    rows = {(r["label"], r["setting"]): r for r in report.compare_published(t, report.Published.load())}
    ours = statistics.fmean([22.97, 23.50])
    r = rows[("LDAM-DRW", "cifar10 exp 100")]
    assert (r["ours_best"], r["published"], r["n"]) == (pytest.approx(ours), 22.97, 2)
    assert r["diff_best"] == pytest.approx(ours - 22.97) and r["diff_final"] == pytest.approx(ours + 1 - 22.97)
    assert rows[("ERM-DRW", "cifar10 exp 10")]["diff_best"] == pytest.approx(0.0)
    assert rows[("LDAM-DRW", "cifar100 step 100")]["published"] == 54.64
    assert len(rows) == 4
    report.generate(stored_runs, tmp_path, published=True)
    md = (tmp_path / "table.md").read_text()
    assert f"| LDAM-DRW | {ours:.2f} vs 22.97 (+{ours - 22.97:.2f}) |" in md
    assert "Table 2" in md and "development logs" in md
    with open(tmp_path / "published.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_published_as_compares_an_image_folder_with_the_cifar_figures(stored_runs, tmp_path):
    """The CIFAR-10 images as an image folder (dataset=imagefolder) are compared with the published CIFAR-10
    figures only when asked (--published-as imagefolder=cifar10); without it, nothing matches."""
    folder = [{**r, "params": {**r["params"], "dataset": "imagefolder"}} for r in stored_runs
              if r["params"]["dataset"] == "cifar10"]
    t = report.build_table(folder)
    assert report.compare_published(t, report.Published.load()) == []
    rows = {(r["label"], r["setting"]): r
            for r in report.compare_published(t, report.Published.load(), {"imagefolder": "cifar10"})}
    r = rows[("LDAM-DRW", "cifar10 exp 100")]
    assert (r["ours_setting"], r["published"]) == ("imagefolder exp 100", 22.97)
    assert r["ours_best"] == pytest.approx(statistics.fmean([22.97, 23.50]))
    assert len(rows) == 3
    report.generate(folder, tmp_path, published=True, published_as={"imagefolder": "cifar10"})
    md = (tmp_path / "table.md").read_text()
    assert "our imagefolder runs with the published cifar10 figures" in md
    assert "| LDAM-DRW | " in md.split("## Against the published figures")[1]
    assert report.parse_published_as(["imagefolder=cifar10"]) == {"imagefolder": "cifar10"}
    with pytest.raises(LongtailError, match="OURS=PUBLISHED"):
        report.parse_published_as(["cifar10"])
    # fault-injection pass: a dataset without published figures was accepted and compared with nothing
    with pytest.raises(LongtailError, match=r"there are no published figures of 'mnist' \(valid: cifar10, cifar100\)"):
        report.parse_published_as(["imagefolder=mnist"])


# ------------------------------------------------------------------------------------ figures

def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        return im.size


def test_figures_are_valid_pngs(tmp_path):
    counts, classes = [500, 120, 40, 9], ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    by_class = [rng.normal(0.3 - 0.1 * i, 0.2, 25) for i in range(4)]
    figures.acc_vs_count(counts, [0.9, 0.7, None, 0.1], [0.92, 0.71, 0.4, 0.2], classes, tmp_path / "a.png")
    figures.per_class_compare(counts, {"CB-RW": ([5, 20, 40, None], [1, 2, 3, None]), "HMM-DRW": ([4, 15, 30, 60], None)},
                              classes, tmp_path / "b.png", title="t")
    figures.margins(by_class, counts, classes, tmp_path / "c.png", unit="cosine")
    figures.margins_compare(counts, {"x": by_class, "y": [v * 100 for v in by_class]}, classes, tmp_path / "d.png")
    for name in "abcd":
        w, h = _png_size(tmp_path / f"{name}.png")
        assert 300 < w < 3000 and 200 < h < 2000


def test_sample_margins():
    logits = np.array([[2.0, 1.0, 0.5], [0.1, 0.3, 0.2], [1.0, 1.0, -1.0]])
    assert sample_margins(logits, [0, 0, 1]).tolist() == pytest.approx([1.0, -0.2, 0.0])


def test_report_figures_from_artifacts(stored_runs, tmp_path):
    """compare + margins + per-run figures, with the artifacts served from a folder."""
    art = tmp_path / "art"
    art.mkdir()
    with open(art / "per_class.csv", "w") as fh:
        fh.write("class,name,train_images,acc_final,acc_best\n0,a,500,0.9,0.9\n1,b,60,0.5,0.6\n2,c,8,0.1,0.2\n")
    with open(art / "margins.csv", "w") as fh:
        fh.write("class,margin\n" + "".join(f"{i % 3},{0.5 - (i % 3) * 0.3 + i / 100}\n" for i in range(30)))

    def fetch(run_id, path, dst):
        src = art / Path(path).name
        if not src.exists():
            return None
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(src, Path(dst) / src.name))

    res = report.generate(stored_runs, tmp_path / "out", fetch=fetch, compare=["ERM-DRW", "LDAM-DRW"])
    out = tmp_path / "out"
    cmp = out / "figures" / "per_class_error_ERM-DRW_vs_LDAM-DRW_cifar10_exp_100.png"
    assert _png_size(cmp)[0] > 300
    assert (out / "figures" / "margins_cifar100_step_100.png").exists()
    run_dirs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(run_dirs) == len(RAW)  # --runs first: one run per cell
    # no PNG artifacts here: acc_vs_count and margins are re-drawn from the CSVs; the per-class CSV is kept
    assert {p.name for p in (out / "runs" / run_dirs[0]).iterdir()} == {"acc_vs_count.png", "margins.png",
                                                                         "per_class.csv"}
    assert "[per_class.csv](runs/" in res["markdown"]
    assert "per_class_error_ERM-DRW_vs_LDAM-DRW_cifar10_exp_100.png" in res["markdown"]
    with pytest.raises(LongtailError, match="no rows for 'HMM-DRW'"):
        report.generate(stored_runs, tmp_path / "o2", fetch=fetch, compare=["ERM-DRW", "HMM-DRW"])


# -------------------------------------------------------------------------------------- sweep

def test_sweep_grid(default_params):
    combos = sweep.build_grid(default_params, losses=["ce", "ldam", "mm"], ratios=["100", "10"], seeds=3,
                              extra=sweep.parse_set(["dataset=digits", "train.milestones=[6,7]"]))
    assert len(combos) == 3 * 2 * 3
    assert combos[0].args() == ["-S", "loss=ce", "-S", "ratio=100", "-S", "seed=0", "-S", "dataset=digits",
                                "-S", "train.milestones=[6,7]"]
    assert {c.label for c in combos} >= {"loss=mm ratio=10 seed=2", "loss=ce ratio=100 seed=0"}
    assert [c.label.split()[-1] for c in combos] == ["seed=0"] * 6 + ["seed=1"] * 6 + ["seed=2"] * 6  # seed-major
    assert [c.label for c in combos[:2]] == ["loss=ce ratio=100 seed=0", "loss=ce ratio=10 seed=0"]
    by_method = sweep.build_grid(default_params, methods=["CB-RS", "HMM-DRW"], seeds=1)
    sets = dict(by_method[0].sets)
    assert sets["train.sampler"] == sets["finetune.sampler"] == "class_balanced" and sets["finetune.reweighting"] == "none"
    assert dict(by_method[1].sets)["losses.mm.as_released"] == "false"


@pytest.mark.parametrize("kwargs, message", [
    ({"losses": ["ce", "foo"]}, "unknown loss 'foo' (valid: am, "),
    ({"methods": ["ERM", "Nope"]}, "unknown method 'Nope' (valid: ERM, "),
    ({"ratios": ["100", "0.5"]}, "--ratio values must be numbers >= 1"),
    ({"imbalances": ["exp", "source"], "ratios": ["100", "10"]}, "--ratio does not apply to imbalance source"),
    ({"extra": [("imbalance", "source")], "ratios": ["100", "10"]}, "--ratio does not apply to imbalance source"),
    ({"datasets": ["mnist"]}, "unknown dataset 'mnist'"),
    ({"seeds": 0}, "--seeds"),
    ({"losses": ["ce"], "methods": ["ERM"]}, "not both"),
    ({"losses": ["ce"], "extra": [("loss", "ldam")]}, "-S loss clashes with the grid"),
    ({"extra": [("train.epochz", "3")]}, "no key 'train.epochz'"),
    ({"extra": [("train.epochs", "0")]}, "seed=0: train.epochs must be >= 1"),
    # plugin parameters are bound and built, also for a strategy nobody selected yet
    ({"extra": [("finetunes.crt.sampler", "class_balancd")]},
     "finetunes.crt.sampler: unknown samplers plugin 'class_balancd' (did you mean class_balanced?)"),
    ({"extra": [("finetunes.crt.epochs", "-1")]}, "finetunes.crt.epochs must be >= 1, got -1"),
])
def test_sweep_validation(default_params, kwargs, message):
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def project(tmp_path, monkeypatch):
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    calls = []

    def fake_dvc(args, check=True):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, f"Queued experiment 'exp-{len(calls)}' for future execution.\n", "")

    monkeypatch.setattr(sweep, "_dvc", fake_dvc)
    # the store and experiment are created before queueing (parallel workers would race to create them)
    monkeypatch.setattr("pipeline.tracking.ensure_experiment", lambda name: calls.append(["ensure", name]))
    return calls


def _main(**kw):
    args = dict(losses=[], methods=[], datasets=[], imbalances=[], ratios=[], seeds=1, extra=[], name=None,
                run=False, jobs=1, dry_run=False, echo=lambda *a: None)
    args.update(kw)
    return sweep.main(Path("params.yaml"), **args)


def test_sweep_queues_one_experiment_per_combination(project):
    assert _main(losses=["ce", "ldam"], seeds=2, extra=["dataset=digits"]) == 0
    assert project[0] == ["ensure", "longtail"]
    queued = project[1:]
    assert len(queued) == 4 and all(c[:3] == ["exp", "run", "--queue"] for c in queued)
    assert queued[3][3:] == ["-S", "loss=ldam", "-S", "seed=1", "-S", "dataset=digits"]


def test_sweep_validates_everything_before_queueing(project):
    with pytest.raises(LongtailError, match="unknown loss 'cee'"):
        _main(losses=["ce", "cee"])
    with pytest.raises(LongtailError, match="loss=ce seed=0: train.epochs must be >= 1"):
        _main(losses=["ce", "ldam"], extra=["train.epochs=0"])
    assert project == []  # nothing was queued


def test_wait_for_the_queue(monkeypatch):
    states = iter([{"a": "Queued", "b": "Queued"}, {"a": "Running", "b": "Queued"},
                   {"a": "Success", "b": "Running"}, {"a": "Success", "b": "Failed", "other": "Running"}])
    monkeypatch.setattr(sweep, "start_queue", lambda jobs: None)
    seen = []
    final = sweep.run_and_wait(["a", "b"], poll=0, echo=seen.append, status=lambda: next(states))
    assert final == {"a": "Success", "b": "Failed"}
    assert "  b: Failed" in seen and sum("a:" in s for s in seen) == 3


def test_the_queue_workers_are_started_again_when_they_exit_with_experiments_queued(monkeypatch):
    """DVC's queue worker exited after a finished experiment (kombu's file broker read an empty
    message: JSONDecodeError) and left the rest Queued for ever; the wait hung. Now it starts the
    workers again, and gives up with one line when they keep exiting."""
    stuck = [{"a": "Success", "b": "Queued"}] * sweep.STALL_POLLS
    states = iter([{"a": "Running", "b": "Queued"}, *stuck, {"a": "Success", "b": "Running"},
                   {"a": "Success", "b": "Success"}])
    started = []
    monkeypatch.setattr(sweep, "start_queue", started.append)
    seen = []
    assert sweep.run_and_wait(["a", "b"], jobs=2, poll=0, echo=seen.append, status=lambda: next(states),
                              sleep=lambda s: None) == {"a": "Success", "b": "Success"}
    assert started == [2, 2] and any("starting 2 worker(s) again" in line for line in seen)
    # another sweep's experiment running: the workers are busy, not gone
    states = iter([{"b": "Queued", "other": "Running"}] * (3 * sweep.STALL_POLLS) + [{"b": "Success"}])
    started.clear()
    sweep.run_and_wait(["b"], poll=0, echo=lambda s: None, status=lambda: next(states), sleep=lambda s: None)
    assert started == [1]
    states = iter([{"b": "Queued"}] * 100)
    with pytest.raises(LongtailError, match="queue workers keep exiting with 1 experiment"):
        sweep.run_and_wait(["b"], poll=0, echo=lambda s: None, status=lambda: next(states), sleep=lambda s: None)


def test_waiting_costs_at_most_a_twentieth_of_a_core(monkeypatch):
    """A status check of a long queue costs CPU (about 1.5 s per call with a dozen experiments, 30% of a
    core at a 5 s poll, taken from the training it waits for): the wait between polls grows with it."""
    states = iter([{"a": "Running"}, {"a": "Running"}, {"a": "Success"}])

    def costly_status():
        t = time.process_time()
        while time.process_time() - t < 0.05:  # burn 50 ms of CPU
            pass
        return next(states)

    monkeypatch.setattr(sweep, "start_queue", lambda jobs: None)
    slept = []
    assert sweep.run_and_wait(["a"], poll=0.2, echo=lambda s: None, status=costly_status,
                              sleep=slept.append) == {"a": "Success"}
    assert len(slept) == 2 and all(s >= 20 * 0.05 for s in slept)
    states = iter([{"a": "Running"}, {"a": "Success"}])
    slept.clear()
    sweep.run_and_wait(["a"], poll=3.0, echo=lambda s: None, status=lambda: next(states), sleep=slept.append)
    assert slept == [3.0]  # a cheap check waits the plain poll interval


def test_sweep_cli_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--loss", "ce,nope", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, env=clean_env(PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: unknown loss 'nope' (valid: ") and out.stderr.count("\n") == 1


# ---------------------------------------------------------------------- dvc plots show, offline

def test_dvc_plots_show_loads_nothing_from_the_web(tmp_path):
    """With the committed .dvc/config (plots.html_template) the page has no remote <script src>."""
    if shutil.which("dvc") is None or shutil.which("git") is None:
        pytest.skip("needs dvc and git")
    repo = tmp_path / "repo"
    repo.mkdir()
    def sh(*cmd):
        subprocess.run(cmd, cwd=repo, env=clean_env(), check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / "dvc_plots_template.html", repo / "dvc_plots_template.html")
    (repo / "plots").mkdir()
    (repo / "plots" / "history.csv").write_text("epoch,test_acc\n0,0.1\n1,0.5\n")
    figures.acc_vs_count([10, 5], [0.5, 0.2], [0.6, 0.3], ["a", "b"], repo / "plots" / "fig.png")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [{"plots/history.csv": {"x": "epoch", "y": "test_acc"}},
                                                             "plots/fig.png"]}))
    sh("dvc", "plots", "show")
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "window.vegaEmbed" in html and "plots/fig.png" in html and '"test_acc"' in html
    import re

    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert "cdn.jsdelivr" not in html


def test_method_names_read_an_mlflow_param_in_exponent_notation_as_the_number():
    """MLflow logs str(1e-05) = "1e-05"; the method table must match it with 1e-05 from YAML."""
    from pipeline.method_names import norm

    assert norm("1e-05") == norm(1e-05) == 1e-05 and norm("[0.01, 1e-05]") == norm([0.01, 1e-05])


def test_the_source_profile_is_one_column_whatever_ratio_params_yaml_holds():
    """imbalance source has no ratio of its own: runs with different (unused) ratio params are one
    setting, named without a ratio."""
    from pipeline.report.table import column_of

    cols = {column_of({"dataset": "imagefolder", "imbalance": "source", "ratio": r}) for r in (100, 10.0, "1")}
    assert cols == {("imagefolder", "source", "")}
    assert report.column_label(cols.pop()) == "imagefolder source"
    assert report.column_label(column_of({"dataset": "cifar10", "imbalance": "exp", "ratio": 100})) \
        == "cifar10 exp 100"


def test_report_command_states_every_option_that_changes_the_output_and_quotes_it_for_a_shell():
    import shlex

    from pipeline.cli import report_command

    plain = dict(out=Path("reports"), published=False, published_as=[], compare=None, runs="first", where=[],
                 ignore=[], experiment="longtail")
    assert report_command(**plain) == "longtail report --experiment longtail --out reports"
    cmd = report_command(**{**plain, "out": Path("results/my page"), "published_as": ["imagefolder=cifar10"],
                            "compare": "ERM,LDAM-DRW", "where": ["longtail.dvc_exp!=c10h-2"], "runs": "all",
                            "ignore": ["train.device"], "experiment": "exp 2"})
    assert cmd == ("longtail report --published-as imagefolder=cifar10 --where 'longtail.dvc_exp!=c10h-2' "
                   "--ignore train.device --compare ERM,LDAM-DRW --runs all --experiment 'exp 2' "
                   "--out 'results/my page'")
    assert shlex.split(cmd)[-2:] == ["--out", "results/my page"]


def test_the_stated_command_survives_a_backtick_in_an_option():
    from pipeline.report import _code

    from testkit.regenerate import STATED

    assert _code("longtail report --out reports") == "`longtail report --out reports`"
    assert _code("longtail report --where 'a=`x`'") == "`` longtail report --where 'a=`x`' ``"
    line = f"Generated by {_code('longtail report --where a=`x` --out r')} from sqlite:///m.db: 2 evaluate runs"
    assert STATED.search(line).group(2) == "longtail report --where a=`x` --out r"


@pytest.mark.parametrize("n_methods", [2, 6, 7])
def test_per_class_compare_keeps_the_title_clear_of_the_legend(tmp_path, monkeypatch, n_methods):
    """With more methods than fit one legend row (3 a row) the title moves up: with a fixed pad,
    six methods' two legend rows covered the title and the second row's labels (a results page's
    figure had that)."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig))
    counts, classes = [500, 100, 20, 5], ["a", "b", "c", "d"]
    series = {f"method-{k}": ([10.0 * k, 20, 30, 40], None) for k in range(n_methods)}
    figures.per_class_compare(counts, series, classes, tmp_path / "x.png")
    fig = kept[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    legend, title = ax.get_legend().get_window_extent(r), ax.title.get_window_extent(r)
    assert title.y0 >= legend.y1, (title, legend)


@pytest.mark.parametrize("figure", ["per_class_compare", "per_class"])
def test_class_names_under_the_bars_do_not_overlap(tmp_path, monkeypatch, figure):
    """CIFAR-10's names at a 7-inch width: "airplane" ran into "automobile" (the report's comparison and
    each run's per-class figure)."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    if figure == "per_class":
        figures.per_class(counts, [0.5] * 10, [0.6] * 10, classes, tmp_path / "x.png")
    else:
        figures.per_class_compare(counts, {"a": ([10.0] * 10, None), "b": ([20.0] * 10, None)}, classes,
                                  tmp_path / "x.png")
    fig = kept[0]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in fig.axes[0].get_xticklabels()]
    assert len(boxes) == 10
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), (a, b)
