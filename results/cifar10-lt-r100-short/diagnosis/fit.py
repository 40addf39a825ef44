"""Per-class fit of finished runs: accuracy on the (un-augmented) training images and on the test images,
after stage 1 (models/pretrain.pt) and after stage 2 (models/final.pt). A stage that trained no epoch
(BBN's stage 1) gets a note instead of rows. For a bilateral-branch model (BBN) two more rows per split
score each branch alone: W_c f_c + b and W_r f_r + b, each branch's share of the test-time logits
W [f_c ; f_r] + b plus the shared bias (so they show what each branch predicts on its own).

Reads each DVC experiment's checkpoints from the DVC cache of the repository it runs in, through the
pipeline's own checkpoint loader (no unpickling), so the figures come from the very models the table
reports. Run from the repository root that holds the experiments:

    python results/cifar10-lt-r100-short/diagnosis/fit.py c10-0 c10b-0 c10h-0
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path.cwd()))
from pipeline import io  # noqa: E402
from pipeline.build import device_data  # noqa: E402
from pipeline.data.store import load_dataset  # noqa: E402
from pipeline.engine.inference import batched  # noqa: E402
from pipeline.registry import build as build_plugin  # noqa: E402

STAGES = {"models/pretrain.pt": "after stage 1", "models/final.pt": "after stage 2"}


def outs_of(exp: str) -> dict[str, str]:
    """path -> md5 of the outputs in experiment `exp`'s dvc.lock."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], check=True,
                          capture_output=True, text=True).stdout.split()
    ref = [r for r in refs if r.rsplit("/", 1)[-1] == exp]
    if len(ref) != 1:
        raise SystemExit(f"fit.py: experiment {exp!r} not found (or not unique) under refs/exps")
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref[0]}:dvc.lock"], check=True,
                                         capture_output=True, text=True).stdout)
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def cached(md5: str) -> Path:
    return Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]


def per_class_accuracy(model, x, y, mean, std, k):
    with torch.no_grad():
        pred = batched(lambda t: model(t).float(), x, mean, std, 500).argmax(1).numpy()
    return class_accuracy(pred, y, k)


def class_accuracy(pred, y, k):
    return [float((pred[y == c] == c).mean()) for c in range(k)]


def branch_logits(model, x, mean, std) -> dict[str, torch.Tensor]:
    """Each branch's share of a bilateral-branch model's test-time logits, with the shared bias:
    W_c f_c + b and W_r f_r + b, whose sum minus b is the model's own output W [f_c ; f_r] + b."""
    w, k = model.classifier.weight, model.branch_dim
    b = model.classifier.bias if model.classifier.bias is not None else torch.zeros(w.shape[0])
    shares = {"conventional branch only": ("conventional", w[:, :k]),
              "re-balancing branch only": ("rebalancing", w[:, k:])}
    with torch.no_grad():
        return {label: batched(lambda t, n=branch, wb=wb: model.branch_features(t, n).float() @ wb.T + b,
                               x, mean, std, 500)
                for label, (branch, wb) in shares.items()}


def main(exps: list[str]) -> None:
    torch.set_num_threads(1)
    loaded = {}
    for exp in exps:
        outs = outs_of(exp)
        key = outs["data/prepared/dataset.npz"]
        if key not in loaded:
            ds = load_dataset(cached(key), require_record=False)  # runs made before the record existed
            loaded[key] = (ds, device_data(ds, torch.device("cpu")))
        ds, data = loaded[key]
        k = len(ds.class_counts)
        y_train, y_test = np.asarray(ds.y_train), np.asarray(ds.y_test)
        print(f"\n### {exp}\n")
        print("| model | split | " + " | ".join(f"{c} ({n})" for c, n in zip(ds.classes, ds.class_counts))
              + " | mean |")
        print("|---|---|" + "---|" * (k + 1))
        notes = []
        for path, label in STAGES.items():
            state = io.load_checkpoint(cached(outs[path]), path, require=("model", "meta"))
            if not state.get("history"):
                notes.append(f"{label}: no epoch trained (`{path}` is the initial model), so no rows.")
                continue
            meta = state["meta"]
            model = build_plugin("models", meta["arch"], k, meta["in_channels"], meta["head"],
                                 params=meta["model_params"], param_key="model")
            model.load_state_dict(state["model"])
            model.eval()
            for split, x, y in (("train", data.x_train, y_train), ("test", data.x_test, y_test)):
                acc = per_class_accuracy(model, x, y, data.mean, data.std, k)
                print(f"| {label} | {split} | " + " | ".join(f"{a:.1%}" for a in acc) + f" | {np.mean(acc):.1%} |")
                if hasattr(model, "branch_features"):
                    for branch, logits in branch_logits(model, x, data.mean, data.std).items():
                        acc = class_accuracy(logits.argmax(1).numpy(), y, k)
                        print(f"| {label}, {branch} | {split} | " + " | ".join(f"{a:.1%}" for a in acc)
                              + f" | {np.mean(acc):.1%} |")
            sys.stdout.flush()
        for note in notes:
            print(f"\n{note}")


if __name__ == "__main__":
    main(sys.argv[1:])
