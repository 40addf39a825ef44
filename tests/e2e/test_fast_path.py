"""The device-resident fast path and the reference pipeline of the LDAM-DRW scripts (PIL images,
torchvision transforms, DataLoader) reach the same accuracy within run-to-run noise."""

import copy

import pytest

from pipeline.params import parse
from pipeline.stages import build_dataset, training

pytestmark = pytest.mark.slow


def test_fast_path_matches_reference_pipeline(tmp_path, default_params):
    raw = copy.deepcopy(default_params)
    raw.update(dataset="digits", ratio=1)
    # lr 0.05 after 2 warm-up epochs: at lr 0.1 after 1, one run of the six (device, seed 1, one thread,
    # AVX-512) collapsed to 49%, noise of the setting that says nothing about the loaders
    raw["train"].update(epochs=10, lr=0.05, warmup_epochs=2, milestones=[7], milestone_factors=[0.01], batch_size=64,
                        device="cpu", precision="fp32", loader_workers=0)  # the loaders, not the precision
    raw["finetune"]["start_epoch"] = 10
    build_dataset.run(parse(raw), out_dir=tmp_path)
    acc = {}
    for loader in ("device", "reference"):
        for seed in (0, 1, 2):
            r = copy.deepcopy(raw)
            r["train"]["loader"], r["seed"] = loader, seed
            trainer, _ = training.setup(parse(r), tmp_path / "dataset.npz")
            trainer.fit(trainer.cfg.epochs)
            acc.setdefault(loader, []).append(trainer.history[-1]["test_acc"])
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    # measured (seeds 0/1/2, AVX-512 CPU): device 0.970/0.970/0.952 and reference 0.956/0.976/0.956 on one
    # thread; device 0.966/0.968/0.958 and reference 0.950/0.978/0.976 on two
    assert min(mean.values()) > 0.9, acc
    assert abs(mean["device"] - mean["reference"]) < 0.06, acc
