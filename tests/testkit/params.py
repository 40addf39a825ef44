"""The project's params, and the tiny digits settings the training tests run on (as `-S` would set them:
pipeline.params.override)."""

from __future__ import annotations

import yaml

from pipeline.params import override

from .paths import ROOT


def project_params() -> dict:
    """The project's params.yaml as a dict: a fresh one on every call (tests change it)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def named_method_params(name: str) -> dict:
    """The settings of a named method (ERM-DRW, BBN, BALMS, ...) as pipeline/method_names.yaml writes them."""
    names = yaml.safe_load((ROOT / "pipeline" / "method_names.yaml").read_text())
    return next(m for m in names["methods"] if m["name"] == name)["params"]


def _tiny_digits(raw: dict, settings: dict) -> dict:
    """What every tiny training test shares: the embedded digits data at r = 10 with 40 images in the
    largest class, on the CPU in float32, a resume checkpoint after every epoch; then `settings` (dotted
    keys). float32, not `auto`: `auto` is bf16 on a CPU with native bf16 and fp32 elsewhere, and the
    tests' references and tolerances are float32 ones, so they must compute the same on every machine
    (bf16 has tests of its own that set it)."""
    return override(raw, {"dataset": "digits", "ratio": 10, "train.device": "cpu", "train.precision": "fp32",
                          "train.checkpoint_every": 1, "data.n_max": 40, **settings})


def tiny_pretrain_finetune(raw: dict, **train) -> dict:
    """Both training stages on tiny digits: 4 epochs, lr x0.1 from epoch 3 and the fine-tune stage (with
    params.yaml's DRW re-weighting) from epoch 2, for the split-run, resume and fingerprint tests of the
    pretrain / finetune stages. `train` sets more train.* keys."""
    return _tiny_digits(raw, {"train.epochs": 4, "train.batch_size": 64, "train.warmup_epochs": 1,
                              "train.milestones": [3], "train.milestone_factors": [0.1],
                              **{f"train.{k}": v for k, v in train.items()}, "finetune.start_epoch": 2})


def tiny_two_stage(raw: dict, epochs: int = 2, **top) -> dict:
    """Stage 1 of a two-stage method on tiny digits: the whole schedule (`epochs`, a constant lr after
    one warm-up epoch, no re-weighting) is stage 1, and the fine-tune strategy (cRT, LWS, BBN, ...) runs
    after it. `top` sets more top-level keys (loss, model, ...)."""
    return _tiny_digits(raw, {**top, "train.epochs": epochs, "train.batch_size": 32, "train.warmup_epochs": 1,
                              "train.milestones": [], "train.milestone_factors": [], "train.eval_batch_size": 256,
                              "finetune.start_epoch": epochs, "finetune.reweighting": "none"})
