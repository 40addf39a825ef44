"""Stage 4: per-class evaluation of the final-epoch and the best-epoch weights on the balanced test
set. Papers in this line (Cao et al. 2019 onwards) report the best test accuracy over all (evaluated) epochs, which
is optimistic; both are written, and the metrics say which is which."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import figures, io
from ..build import describe_device, device_data, pick_device
from ..data.store import check_built_with, load_dataset
from ..engine.inference import batched
from ..engine.metrics import classification_report, sample_margins
from ..engine.trainer import best_model, eval_batch_size
from ..errors import LongtailError
from ..params import Params
from ..registry import build as build_plugin
from ..registry import plugin_versions
from .training import DATASET, FINAL, FINAL_CHECKPOINT, check_fits, check_made_with

METRICS = Path("metrics/eval.json")
PLOTS = Path("plots")
SUMMARY_KEYS = ("top1", "error", "many", "medium", "few")


def run(p: Params, log=None, dataset: Path = DATASET, final: Path = FINAL, metrics: Path = METRICS,
        plots: Path = PLOTS) -> dict:
    io.check_outputs(plots, metrics)  # before any work
    ds = load_dataset(dataset)
    check_built_with(ds, p, dataset)
    state = io.load_checkpoint(final, "final checkpoint", "finetune", require=FINAL_CHECKPOINT)
    meta = state["meta"]
    if meta.get("class_counts") != ds.class_counts:
        raise LongtailError(f"{final} was trained on other data than {dataset}: re-run `dvc repro`")
    check_made_with(state, "finetune", p, dataset, final, "final checkpoint")  # not a stale model under new params
    device = pick_device(p.train.device)
    print(f"evaluate: {describe_device(device)}", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = build_plugin("models", meta["arch"], len(ds.class_counts), meta["in_channels"], meta["head"],
                         params=meta["model_params"], param_key="model")
    check_fits(model, state, "final checkpoint", final, meta["arch"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    data = device_data(ds, device)
    # evaluate in the precision the model was trained and selected in (train.precision, resolved)
    precision = meta.get("precision", "fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    channels_last = bool(meta.get("channels_last", False))  # and in its memory layout
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def logits_of(m):
        bs = eval_batch_size(p.train.eval_batch_size, device)
        return batched(lambda x: m(x).float().cpu(), data.x_test, data.mean, data.std, bs, autocast,
                       channels_last=channels_last).numpy()

    y = ds.y_test
    final_logits = logits_of(model)
    final_pred = final_logits.argmax(1)
    # None also when the best epoch was the last one (always in a one-epoch run): one pass over the test
    # set serves both (10,000 CIFAR images cost half a minute on a CPU core)
    best = best_model(model, state)
    best_pred = logits_of(best.eval()).argmax(1) if best is not None else final_pred
    rep_final = classification_report(y, final_pred, ds.class_counts)
    rep_best = classification_report(y, best_pred, ds.class_counts)
    history = state["history"]
    evaluated = [r["epoch"] for r in history if "test_acc" in r]
    result = {
        # epochs are numbered from 1 everywhere a user reads them (console, here, history.csv, MLflow, figures)
        "final": {"epoch": state["epoch"], **{k: rep_final[k] for k in SUMMARY_KEYS}},
        "best": {"epoch": state["best"]["epoch"] + 1, **{k: rep_best[k] for k in SUMMARY_KEYS}},
        "epochs_evaluated": len(evaluated),
        "shots": {g: rep_final[f"{g}_classes"] for g in ("many", "medium", "few")},
        "precision": precision,
    }
    plugins = plugin_versions(p.raw)
    if plugins:  # third-party plugin packages live outside the repository: record what ran
        result["provenance"] = {"plugins": plugins}
    classes = ds.classes
    # all or nothing, eval.json last: a failed or interrupted run (MLflow logging included, so that the
    # files and a FINISHED run always go together) leaves the previous outputs whole
    with io.atomic_outputs(plots, metrics) as (out, eval_json):
        io.write_json(eval_json, result)
        io.write_csv(out / "per_class.csv", ["class", "name", "train_images", "acc_final", "acc_best"],
                     [[i, classes[i], ds.class_counts[i], rep_final["per_class"][i], rep_best["per_class"][i]]
                      for i in range(len(classes))])
        io.write_csv(out / "history.csv", ["epoch", "lr", "train_loss", "train_acc", "test_acc"],
                     [[r["epoch"] + 1, r["lr"], r["train_loss"], r["train_acc"], r.get("test_acc", "")]
                      for r in history])
        io.write_csv(out / "confusion.csv", ["actual", "predicted"],
                     [[classes[a], classes[b]] for a, b in zip(y.tolist(), final_pred.tolist())])
        figures.curves(history, p.finetune.start_epoch, out / "curves.png")
        figures.per_class(ds.class_counts, rep_final["per_class"], rep_best["per_class"], classes,
                          out / "per_class.png")
        figures.confusion(rep_final["confusion"], classes, out / "confusion.png")
        figures.acc_vs_count(ds.class_counts, rep_final["per_class"], rep_best["per_class"], classes,
                             out / "acc_vs_count.png")
        # per-sample margins z_y - max_{j != y} z_j of the final model (cosine units for cosine heads)
        margins = sample_margins(final_logits, y)
        io.write_csv(out / "margins.csv", ["class", "margin"],
                     [[int(c), f"{m:.6g}"] for c, m in zip(y.tolist(), margins)])
        figures.margins([margins[y == c] for c in range(len(classes))], ds.class_counts, classes,
                        out / "margins.png", unit="cosine" if str(meta.get("head")) == "cosine" else "logits")

        if log is not None:
            flat = {f"{which}_{k}": v for which, rep in (("final", result["final"]), ("best", result["best"]))
                    for k, v in rep.items() if v is not None}
            flat.update({f"class_acc_final/{i:03d}": a for i, a in enumerate(rep_final["per_class"]) if a is not None})
            flat.update({f"class_acc_best/{i:03d}": a for i, a in enumerate(rep_best["per_class"]) if a is not None})
            log.log_metrics(flat)
            log.log_table({"class": list(range(len(classes))), "name": [str(c) for c in classes],
                           "train_images": list(ds.class_counts),
                           "acc_final": rep_final["per_class"], "acc_best": rep_best["per_class"]},
                          "evaluation/per_class_table.json")
            if log.parent is not None:  # the whole schedule (pretrain + finetune) on the pipeline's run
                log.parent.log_history(history)
            for f in (eval_json, *sorted(out.iterdir())):
                log.log_artifact(f, "evaluation")
    print(f"evaluate: final epoch {result['final']['epoch']}: top-1 {100 * rep_final['top1']:.2f}% "
          f"(many {_pct(rep_final['many'])} / medium {_pct(rep_final['medium'])} / few {_pct(rep_final['few'])}); "
          f"best epoch {result['best']['epoch']}: top-1 {100 * rep_best['top1']:.2f}%")
    return result


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"
